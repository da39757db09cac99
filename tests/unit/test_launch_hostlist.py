"""Slurm's compact host lists (``man scontrol``, HOSTLIST EXPRESSIONS) expanded by our parser."""
import pytest

from difftrain.launch.hostlist import expand_hostlist


@pytest.mark.parametrize("text, hosts", [
    ("gpu5", ["gpu5"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),  # padded to the width of the low end
    ("tux[1-2]-ib", ["tux1-ib", "tux2-ib"]),  # a suffix after the brackets
    ("rack[1-2]n[1-2]", ["rack1n1", "rack1n2", "rack2n1", "rack2n2"]),  # several brackets: their product
    ("a,b[3],c.example.org", ["a", "b3", "c.example.org"]),
    ("[1-2]", ["1", "2"]),
])
def test_expands(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, why", [
    ("node[01-03", "unclosed"), ("node01-03]", "unbalanced"), ("n[[1]]", "nested"), ("a,,b", "empty name"),
    ("n[a-b]", "numbers"), ("n[3-1]", "backwards"), ("n[1-]", "numbers"), ("", "empty"),
])
def test_refuses_malformed_lists_naming_the_variable(text, why):
    with pytest.raises(ValueError, match=why) as e:
        expand_hostlist(text, "SLURM_JOB_NODELIST")
    assert str(e.value).startswith("SLURM_JOB_NODELIST")
