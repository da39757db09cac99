"""Evaluation through the real CLI: validation during training, ``difftrain eval`` on 1 and 2 ranks,
NFE sweeps with a plot, resuming from stored chunks, and an exported model."""
import json
import re
import sys

import pytest

from tests.conftest import run_cmd, torchrun

LINE = re.compile(r"^fid=\S+ kid=\S+ kid_std=\S+ precision=\S+ recall=\S+ class_acc=\S+$")


def eval_args(demo_run, cache, out, *extra):
    return ["-m", "difftrain", "eval", *extra, "--ref", str(demo_run / "digits" / "val" / "{00000..00000}.tar"),
            "--extractor", "digits", "--samples", "48", "--chunk", "16", "--batch", "16", "--cache-dir", str(cache),
            "--out", str(out)]


@pytest.fixture(scope="module")
def sweep(demo_run, eval_cache):
    """The same sweep on 1 process and on 2 ranks."""
    run = str(demo_run / "run")
    sweep = ["--steps", "2,4", "--sampler", "euler,heun"]
    one = run_cmd([sys.executable, *eval_args(demo_run, eval_cache, demo_run / "eval1", run), *sweep])
    two = torchrun(2, eval_args(demo_run, eval_cache, demo_run / "eval2", run) + sweep)
    return one, two


def test_validation_logs_scores_loss_by_t_and_grid(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(demo_run / "run" / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("eval/fid", "eval/kid", "eval/precision", "eval/recall", "eval/class_acc", "eval/loss",
                "eval/straightness"):
        assert [e.step for e in acc.Scalars(tag)] == [30, 60], tag
    by_t = [t for t in tags if t.startswith("eval/loss_by_t/")]
    assert len(by_t) == 10
    low, high = acc.Scalars("eval/loss_by_t/0.0-0.1")[-1].value, acc.Scalars("eval/loss_by_t/0.9-1.0")[-1].value
    assert low != high
    assert 0.0 <= acc.Scalars("eval/class_acc")[-1].value <= 1.0
    assert "eval/samples" in acc.Tags()["images"]
    assert acc.Scalars("eval/straightness")[-1].value > 0


def test_sweep_table_plot_and_same_results_on_two_ranks(demo_run, sweep):
    one, two = sweep
    last = one.stdout.strip().splitlines()[-1]
    assert LINE.match(last), last
    rows1 = json.loads((demo_run / "eval1" / "results.json").read_text())
    rows2 = json.loads((demo_run / "eval2" / "results.json").read_text())
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows1] == [
        ("euler", 2, 2), ("euler", 4, 4), ("heun", 2, 3), ("heun", 4, 7)]
    assert rows1 == rows2  # the chunks, so every figure, do not depend on the world size
    assert (demo_run / "eval1" / "fid_vs_nfe.png").stat().st_size > 1000
    assert "| run | step | sampler |" in one.stdout
    for r in rows1:
        assert r["fid"] >= 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and 0 <= r["class_acc"] <= 1


def test_eval_resumes_from_stored_chunks(demo_run, eval_cache, sweep):
    folder = next((demo_run / "eval1" / "run").glob("euler_4steps_*"))
    chunks = sorted(folder.glob("chunk_*.safetensors"))
    assert [c.name.split("_", 1)[1] for c in chunks] == ["00000_16.safetensors", "00001_16.safetensors",
                                                         "00002_16.safetensors"]
    before = {c.name: (c.stat().st_mtime_ns, c.read_bytes()) for c in chunks}
    chunks[1].unlink()  # as if the job was killed before writing it
    p = run_cmd([sys.executable, *eval_args(demo_run, eval_cache, demo_run / "eval1", str(demo_run / "run")),
                 "--steps", "4", "--sampler", "euler"])
    after = {c.name: (c.stat().st_mtime_ns, c.read_bytes()) for c in sorted(folder.glob("chunk_*.safetensors"))}
    assert after.keys() == before.keys()
    assert after[chunks[0].name] == before[chunks[0].name]  # kept, not redone
    assert after[chunks[1].name][1] == before[chunks[1].name][1]  # redone, bit for bit
    rows = json.loads((demo_run / "eval1" / "results.json").read_text())
    assert p.stdout.strip().splitlines()[-1] == " ".join(
        f"{k}={rows[0][k]:.6g}" for k in ("fid", "kid", "kid_std", "precision", "recall", "class_acc"))


def test_eval_an_export(demo_run, eval_cache, sweep, tmp_path):
    run_cmd([sys.executable, "-m", "difftrain", "export", str(demo_run / "run"), "--out", str(tmp_path / "export")])
    p = run_cmd([sys.executable, *eval_args(demo_run, eval_cache, tmp_path / "out", str(tmp_path / "export")),
                 "--steps", "4", "--sampler", "euler"])
    exported = json.loads((tmp_path / "out" / "results.json").read_text())[0]
    trained = next(r for r in json.loads((demo_run / "eval2" / "results.json").read_text())
                   if (r["sampler"], r["steps"]) == ("euler", 4))
    for k in ("fid", "kid", "precision", "recall", "class_acc"):
        assert exported[k] == pytest.approx(trained[k], rel=1e-4, abs=1e-6), k
    assert LINE.match(p.stdout.strip().splitlines()[-1])


def test_clip_score_of_a_text_model(demo_run, eval_cache, tmp_path):
    """A (tiny, random) CLIP folder as extractor: FID on CLIP features and the CLIP score of the captions."""
    from tests.unit.test_eval_extractors import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip")
    args = eval_args(demo_run, eval_cache, tmp_path / "out", str(demo_run / "run"))
    args[args.index("digits")] = f"clip:{clip}"
    p = run_cmd([sys.executable, *args, "--steps", "2", "--sampler", "euler"])
    row = json.loads((tmp_path / "out" / "results.json").read_text())[0]
    assert 0 <= row["clip_score"] <= 100 and "class_acc" not in row
    assert re.match(r"^fid=\S+ kid=\S+ kid_std=\S+ precision=\S+ recall=\S+ clip_score=\S+$",
                    p.stdout.strip().splitlines()[-1])
