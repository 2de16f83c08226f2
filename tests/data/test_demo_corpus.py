import sys

from data.demo import MIN_DOC_CHARS, SKIP_DIRS, demo_documents, normalise, stdlib_root, stdlib_sources


def test_corpus_is_deterministic_english():
    a = demo_documents(100_000)
    b = demo_documents(100_000)
    assert a == b
    text = " ".join(a)
    words = text.lower().split()
    for word in ("the", "return", "is", "of"):
        assert word in words
    assert sum(map(len, a)) >= 100_000
    assert sum(map(len, a[:-1])) < 100_000  # stops after the document that reaches the size


def test_documents_are_normalised():
    for doc in demo_documents(50_000):
        assert len(doc) >= MIN_DOC_CHARS
        assert doc == doc.strip()
        assert "\n\n\n" not in doc and "  " not in doc and "\t" not in doc
        for paragraph in doc.split("\n\n"):
            assert paragraph and "\n" not in paragraph


def test_normalise_keeps_paragraphs():
    raw = "Title\n=====\n\n  First   line\n  continues.\n\n\n\tSecond\tparagraph.  \n"
    assert normalise(raw) == "Title\n\nFirst line continues.\n\nSecond paragraph."


def test_sources_sorted_and_skipped():
    root = stdlib_root()
    files = stdlib_sources(root)
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)
    assert all(not SKIP_DIRS.intersection(r.split("/")[:-1]) for r in rel)
    assert "argparse.py" in rel


def test_modules_are_never_imported():
    # Importing `antigravity` opens a web browser, `this` prints the Zen: read with ast only.
    for name in ("antigravity", "this"):
        sys.modules.pop(name, None)
    demo_documents(10**9)  # the whole standard library
    assert "antigravity" not in sys.modules and "this" not in sys.modules
