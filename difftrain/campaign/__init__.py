"""Campaigns: named training stages and pair steps chained by ``from:``, run in order by one driver on every rank,
then evaluated into one table (docs/CAMPAIGNS.md).

    spec.py     the campaign file: parsing, ``from:`` semantics, each stage's config
    decide.py   finished / interrupted / changed / rerun: what is done with each stage
    runner.py   ``difftrain campaign FILE``: the stages in order (Trainer, pairs writer), then evaluation
    dryrun.py   ``--dry-run``: every stage on the meta device; modules, memory per rank, layout, the chain
    results.py  evaluation of every stage: results.json, results.md, fid_vs_nfe.png
"""
