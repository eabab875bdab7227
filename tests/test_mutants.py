"""The mutation check (tests/mutants.py) stays runnable: every named mutation still applies.

Running the mutations takes minutes (`make mutants`); checking that each still finds its text
takes milliseconds, so the suite tells at once when a change to the code moved a mutated line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import mutants

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mutation", mutants.MUTATIONS, ids=lambda m: m.name)
def test_every_named_mutation_applies_to_the_tree(mutation: mutants.Mutation) -> None:
    # The text to replace is in its file exactly once, and the replacement changes it;
    assert mutants.check_applies(mutation) is None
    assert mutation.new != mutation.old
    # the tests it names exist.
    for path in mutants.targeted_files([mutation]):
        assert (ROOT / path).is_file(), path


def test_mutations_have_distinct_names() -> None:
    names = [m.name for m in mutants.MUTATIONS]
    assert len(set(names)) == len(names)


def test_a_mutation_is_applied_to_a_copy_never_to_the_tree(tmp_path: Path) -> None:
    mutation = mutants.MUTATIONS[0]
    original = (ROOT / mutation.path).read_text(encoding="utf-8")
    tree = tmp_path / "repo"
    (tree / mutation.path).parent.mkdir(parents=True)
    (tree / mutation.path).write_text(original, encoding="utf-8")
    mutants.apply(mutation, tree)
    mutated = (tree / mutation.path).read_text(encoding="utf-8")
    assert mutated == original.replace(mutation.old, mutation.new)
    assert (ROOT / mutation.path).read_text(encoding="utf-8") == original
    with pytest.raises(LookupError, match="0 times"):
        mutants.apply(mutation, tree)  # applied already: the old text is gone


def test_the_verdict_names_the_failing_test() -> None:
    output = (
        "------------------------------ Captured log call -------------------------------\n"
        "ERROR    timeline.api:api.py:292 unhandled error on POST /timeline/sendGroup\n"
        "=========================== short test summary info ============================\n"
        "FAILED tests/test_api.py::test_bad[sqlite-colon in from] - assert 200 == 400\n"
        "FAILED tests/test_api.py::test_other\n"
        "!!!!!!!!!!!!!!!!!!!!!!!!!! stopping after 2 failures !!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    )
    assert mutants.verdict(1, output) == (
        "killed by tests/test_api.py::test_bad[sqlite-colon in from] and 1 more:\n"
        "    tests/test_api.py::test_other"
    )
    assert mutants.verdict(0, "1 passed") == "SURVIVED"
    assert mutants.verdict(5, "no tests ran").startswith("NO TESTS RAN")
