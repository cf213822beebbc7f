"""The package has no import circles, lazy (function-level) imports included: a circle that a lazy import
"breaks" still ties the two modules together. (pyproject's import-linter contracts keep the layers.)"""

from __future__ import annotations

import grimp


def _circles(package: str) -> list[list[str]]:
    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    found = []
    for a in sorted(graph.modules):
        for b in sorted(graph.find_modules_directly_imported_by(a)):
            back = graph.find_shortest_chain(importer=b, imported=a) if b != a else None
            if back:
                found.append([a, *back])
    return found


def test_no_import_circles_in_the_package() -> None:
    circles = _circles("rayflow")
    assert not circles, "import circles (FIX THIS by moving the shared part into a module both import):\n" + "\n".join(
        " -> ".join(c) for c in circles)


def test_the_check_finds_a_lazy_circle(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "circ"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from circ import b\n")
    (pkg / "b.py").write_text("def f():\n    from circ import a  # lazy\n    return a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _circles("circ") == [["circ.a", "circ.b", "circ.a"], ["circ.b", "circ.a", "circ.b"]]
