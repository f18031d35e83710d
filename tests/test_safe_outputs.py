"""Nothing outside --out is written or deleted: every command that takes --out replaces only what it wrote itself
(its marker file), refuses an --out that overlaps its inputs, and names from data never become paths unchecked."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rawlog import random_raw

from cli.main import main as ctr
from features.outputs import OutputError
from pipelines.build import build_dataset
from pipelines.config import load_build_config
from pipelines.importers import import_taobao_userbehavior
from pipelines.outdirs import OutputLock, prepare_demo_dir
from pipelines.synthetic import generate
from pipelines.validate import DataError

UB_CSV = "1,10,100,pv,1000\n1,11,100,buy,1001\n2,10,100,pv,1002\n2,12,101,cart,1003\n3,11,100,pv,1004\n"


def _cfg(*extra: str):
    return load_build_config(None, ["ray.num_partitions=2", *extra])


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256): what must survive a refused command."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def user_raw(tmp_path) -> Path:
    """A raw directory that a user wrote by hand (no source.json): no command may replace it."""
    raw = random_raw(tmp_path / "raw", seed=4, behaviors=60, impressions=30)
    (raw / "README.txt").write_text("my data\n")
    return raw


@pytest.fixture
def ub_src(tmp_path) -> Path:
    src = tmp_path / "src" / "UserBehavior.csv"
    src.parent.mkdir()
    src.write_text(UB_CSV)
    return src


# --------------------------------------------------------------------------------------------------------------------
# a raw directory survives every command that takes --out
# --------------------------------------------------------------------------------------------------------------------
def _argv(command: str, raw: Path, tmp_path: Path, ub_src: Path, data: Path | None) -> list[str]:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "config.json").write_text("{}")
    return {
        "generate": ["generate", "--preset", "tiny", "--out", str(raw)],
        "import": ["import", "taobao-userbehavior", str(ub_src), "--out", str(raw)],
        "build": ["build", "--raw", str(raw), "--out", str(raw), "--overwrite"],
        "build-parent": ["build", "--raw", str(raw), "--out", str(raw.parent), "--overwrite"],
        "build-inside": ["build", "--raw", str(raw), "--out", str(raw / "data"), "--overwrite"],
        "train": [
            "train",
            "--data",
            str(data),
            "--model",
            "din",
            "--out",
            str(raw),
            "--set",
            "train.max_steps=1",
            "--set",
            "data.num_workers=0",
        ],
        "report": ["report", str(run), "--out", str(raw)],
        "demo": ["demo", "--quick", "--out", str(raw)],
    }[command]


@pytest.mark.parametrize(
    "command", ["generate", "import", "build", "build-parent", "build-inside", "train", "report", "demo"]
)
def test_raw_dir_survives_every_command(command, user_raw, tmp_path, ub_src, capsys, request):
    data = request.getfixturevalue("tiny_data") if command == "train" else None
    argv = _argv(command, user_raw, tmp_path, ub_src, data)
    before = _snapshot(tmp_path)
    assert ctr(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "How to fix" in err, err
    assert _snapshot(tmp_path) == before, f"ctr {command} changed files it did not write"
    assert not list(tmp_path.glob(".*")), "a lock or temporary directory was left beside the output"


# --------------------------------------------------------------------------------------------------------------------
# ctr build
# --------------------------------------------------------------------------------------------------------------------
def test_build_overwrite_refuses_a_user_dir(user_raw, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("months of work\n")
    with pytest.raises(OutputError, match=r"not a dataset directory.*manifest\.json.*thesis\.tex") as info:
        build_dataset(user_raw, out, _cfg("output.overwrite=true"))
    assert str(out) in str(info.value)
    assert (out / "thesis.tex").read_text() == "months of work\n"
    with pytest.raises(OutputError, match="not a directory"):
        build_dataset(user_raw, out / "thesis.tex", _cfg("output.overwrite=true"))


def test_build_replaces_only_its_own_dataset_and_cleans_stale_siblings(user_raw, tmp_path, ray_local):
    out = tmp_path / "data"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # a dataset that ctr build wrote (its marker)
    (out / "extra.txt").write_text("inside a dataset: replaced with it\n")
    with pytest.raises(OutputError, match="already there.*--overwrite"):
        build_dataset(user_raw, out, _cfg())
    # what a build killed before publishing leaves beside --out (the lock is free: its process is gone)
    for stale in (".data.tmp-deadbeef", ".data.old-cafecafe"):
        (tmp_path / stale / "sequences").mkdir(parents=True)
    (tmp_path / ".other.tmp-deadbeef").mkdir()  # not ours (another output's name): left alone
    manifest = build_dataset(user_raw, out, _cfg("output.overwrite=true"))
    assert json.loads((out / "manifest.json").read_text())["tables"] == manifest["tables"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".other.tmp-deadbeef"]
    assert not (out / "extra.txt").exists()


def test_second_build_into_the_same_out_fails_clearly(user_raw, tmp_path):
    out = tmp_path / "data"
    with OutputLock(out, "dataset directory"):  # what a running build holds
        with pytest.raises(OutputError, match="another process is writing"):
            build_dataset(user_raw, out, _cfg())
        assert (tmp_path / ".data.lock").exists()
    assert not out.exists() and not list(tmp_path.glob(".data*"))


def test_output_lock_is_exclusive_and_leaves_nothing(tmp_path):
    out = tmp_path / "x"
    lock = OutputLock(out, "dataset directory").acquire()
    with pytest.raises(OutputError):
        OutputLock(out, "dataset directory").acquire()
    lock.release()
    assert not list(tmp_path.iterdir())
    with OutputLock(out, "dataset directory"):  # free again
        pass


# --------------------------------------------------------------------------------------------------------------------
# names from data
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../evil", "a b", "vocab/x", "1st", "brand-id"])
def test_column_names_that_would_become_paths_are_refused_at_scan(name, user_raw, tmp_path):
    items = user_raw / "items.parquet"
    pq.write_table(pq.read_table(items).append_column(name, pa.array([0] * 50, pa.int64())), items)
    with pytest.raises(DataError) as info:
        build_dataset(user_raw, tmp_path / "data", _cfg())
    msg = str(info.value)
    for part in (str(items), repr(name), "not an identifier", "[A-Za-z_][A-Za-z0-9_]*", "How to fix", "rename"):
        assert part in msg, (part, msg)
    assert not (tmp_path / "data").exists() and not list(tmp_path.rglob("evil*"))


@pytest.mark.parametrize(
    ("table", "column", "clash"),
    [("impressions", "brand_id", "items column 'brand_id'"), ("items", "user", "the user ids")],
)
def test_id_space_clashes_are_refused_at_scan(table, column, clash, user_raw, tmp_path):
    path = user_raw / f"{table}.parquet"
    t = pq.read_table(path)
    pq.write_table(t.append_column(column, pa.array([1] * t.num_rows, pa.int64())), path)
    with pytest.raises(DataError, match="How to fix") as info:
        build_dataset(user_raw, tmp_path / "data", _cfg())
    assert clash in str(info.value) and str(path) in str(info.value)


def test_build_checks_paths_from_names_even_past_the_scan(user_raw, tmp_path, ray_local, monkeypatch):
    """Defence in depth: with the scan's name check switched off, the vocabulary path is still refused."""
    import pipelines.scan as V

    monkeypatch.setattr(V, "_check_name", lambda *a: None)
    items = user_raw / "items.parquet"
    pq.write_table(pq.read_table(items).append_column("../../evil", pa.array([0] * 50, pa.int64())), items)
    with pytest.raises(OutputError, match="not an identifier"):
        build_dataset(user_raw, tmp_path / "data", _cfg())
    assert not list(tmp_path.rglob("evil*")) and not (tmp_path / "data").exists()
    assert not list(tmp_path.glob(".data*"))


# --------------------------------------------------------------------------------------------------------------------
# ctr generate, ctr import: raw directories (marker source.json)
# --------------------------------------------------------------------------------------------------------------------
def test_generate_refuses_a_user_dir_and_replaces_its_own(user_raw, tmp_path):
    before = _snapshot(user_raw)
    with pytest.raises(OutputError, match=r"not a raw directory.*source\.json"):
        generate("tiny", 0, user_raw)
    assert _snapshot(user_raw) == before

    raw = tmp_path / "gen"
    generate("tiny", 0, raw, n_users=20)
    (raw / "notes.txt").write_text("kept\n")
    (raw / "behaviors" / "part-09999.parquet").write_bytes(b"a stale part of another world")
    summary = generate("tiny", 1, raw, n_users=20)  # its own earlier output: replaced (tables + source.json only)
    assert (raw / "notes.txt").read_text() == "kept\n"
    assert not (raw / "behaviors" / "part-09999.parquet").exists()
    assert json.loads((raw / "source.json").read_text())["seed"] == 1 == summary["seed"]
    assert not list(tmp_path.glob(".gen*"))


def test_interrupted_generate_is_refused_by_build_and_redone_by_generate(tmp_path):
    raw = tmp_path / "gen"
    generate("tiny", 0, raw, n_users=20)
    # what a generate killed mid-way leaves: the placeholder marker it writes first
    (raw / "source.json").write_text(json.dumps({"incomplete": True, "writer": "ctr generate"}))
    with pytest.raises(DataError, match="incomplete.*ctr generate"):
        build_dataset(raw, tmp_path / "data", _cfg())
    assert not (tmp_path / "data").exists()
    generate("tiny", 0, raw, n_users=20)
    assert "incomplete" not in json.loads((raw / "source.json").read_text())


def test_import_refuses_a_user_dir_and_an_overlapping_source(user_raw, tmp_path, ub_src):
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError, match=r"not a raw directory.*source\.json"):
        import_taobao_userbehavior(ub_src, user_raw)
    for out, relation in [(ub_src.parent, "is"), (ub_src.parent / "raw", "is inside"), (tmp_path, "contains")]:
        with pytest.raises(OutputError, match=f"{relation} the import source"):
            import_taobao_userbehavior(ub_src.parent, out)
    assert _snapshot(tmp_path) == before

    raw = tmp_path / "imported"
    import_taobao_userbehavior(ub_src, raw)
    (raw / "notes.txt").write_text("kept\n")
    s = import_taobao_userbehavior(ub_src, raw)  # re-import into its own output
    assert s["rows"]["behaviors"] == 5 and (raw / "notes.txt").exists()


# --------------------------------------------------------------------------------------------------------------------
# ctr report (marker report.md), ctr demo (marker demo.json)
# --------------------------------------------------------------------------------------------------------------------
def test_report_out_rules(tmp_path):
    from test_report import _make_run

    from ctr.report import render_report

    run = _make_run(tmp_path / "runs", "a", "din", 0.5, 1)
    for out, relation in [(run, "is"), (run / "report", "is inside"), (tmp_path / "runs", "contains")]:
        with pytest.raises(OutputError, match=f"{relation} the run directory"):
            render_report([run], out)
    user = tmp_path / "docs"
    user.mkdir()
    (user / "paper.md").write_text("draft\n")
    with pytest.raises(OutputError, match=r"not a report directory.*report\.md"):
        render_report([run], user)
    assert [p.name for p in user.iterdir()] == ["paper.md"]

    out = tmp_path / "report"
    render_report([run], out)
    (out / "notes.txt").write_text("kept\n")
    paths = render_report([run], out)  # its own earlier report: rewritten, other files kept
    assert paths["markdown"].read_text().startswith("# ") and (out / "notes.txt").exists()


def test_demo_dir_rules(tmp_path):
    user = tmp_path / "work"
    user.mkdir()
    (user / "data.csv").write_text("1,2\n")
    with pytest.raises(OutputError, match=r"not a demo directory.*demo\.json"):
        prepare_demo_dir(user, {})
    assert [p.name for p in user.iterdir()] == ["data.csv"]
    out = prepare_demo_dir(tmp_path / "demo", {"seed": 3})
    assert json.loads((out / "demo.json").read_text())["seed"] == 3
    (out / "raw").mkdir()
    prepare_demo_dir(out, {"seed": 4})  # an earlier demo's directory is reused
    assert json.loads((out / "demo.json").read_text())["seed"] == 4 and (out / "raw").is_dir()
