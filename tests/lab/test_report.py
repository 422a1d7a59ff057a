"""bnkit report --quick: files, figures, determinism, atomicity, and a real browser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")

from bnkit.cli import main
from bnkit.lab import report as report_mod
from bnkit.lab.experiments import NAMES, with_without


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    assert main(["report", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_report_writes_every_section(quick_report: Path) -> None:
    html = (quick_report / "report.html").read_text()
    results = json.loads((quick_report / "results.json").read_text())
    assert list(results["sections"]) == NAMES
    for name, sec in results["sections"].items():
        assert sec["summary"], name
        assert f"id='{name}'" in html
        for plot in sec["plots"]:
            png = (quick_report / plot).read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in html  # self-contained
    conf = results["sections"]["conformance"]["results"]
    assert conf["bnkit.BatchNorm2d"]["ok"] and conf["torch.nn.BatchNorm2d"]["ok"]
    assert not any(conf[k]["ok"] for k in conf if k.startswith("scratch."))
    assert results["meta"]["seed"] == 0 and results["meta"]["quick"] is True


def test_quick_report_shows_what_it_claims(quick_report: Path) -> None:
    r = json.loads((quick_report / "results.json").read_text())["sections"]
    assert max(r["freezing"]["results"]["drift_bnkit_freeze"]) == 0.0
    assert max(r["freezing"]["results"]["drift_requires_grad_only"]) > 0.0
    bs = r["batch_size"]["results"]
    assert len(set(bs["eval mode"].values())) == 1  # eval: independent of batch size
    assert bs["train mode"]["1"] is None  # one value per channel
    sv = r["scratch_vs_builtin"]["results"]
    assert sv["max_loss_gap_bnkit_vs_torch"] < 1e-3
    tp = r["throughput"]["results"]
    assert "timed in turn" in tp["what"]
    assert tp["torch BatchNorm"]["time_vs_torch"] == 1.0
    assert "Dive into Deep Learning's BatchNorm" in tp
    sb = r["small_batch"]["results"]
    for cell in (v for method in sb.values() for v in method.values()):
        assert str(cell["lr"]) in cell["validation_acc_by_lr"]  # chosen on validation
        assert cell["validation_acc_by_lr"][str(cell["lr"])] == max(
            cell["validation_acc_by_lr"].values()
        )
    ls = r["layer_stats"]["results"]
    assert [row["name"] for row in ls["layers"]] == ["1", "5", "10", "13"]  # LeNet's four BNs
    assert all(len(v["running_var_avg"]) == 1 for v in ls["by_epoch"].values())  # 1 epoch


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        report_mod.build_report(out, quick=True, only=["with_without"], progress=False)
        outs.append(json.loads((out / "results.json").read_text())["sections"])
    assert outs[0] == outs[1]


def test_interrupted_run_leaves_previous_report(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "rep"
    report_mod.build_report(out, quick=True, only=["batch_size"], progress=False)
    before = sorted(p.name for p in out.iterdir())

    def boom(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(with_without, "run", boom)
    assert (
        main(["report", "--quick", "--out", str(out), "--only", "with_without", "--no-progress"])
        == 130
    )
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # no staging dir left behind


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path, capsys) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["report", "--quick", "--out", str(tmp_path)]) == 2
    assert "not a bnkit report directory" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_bad_arguments(tmp_path: Path, capsys) -> None:
    assert main(["report", "--only", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown experiment(s) ['nope']" in capsys.readouterr().err
    assert main(["report", "--data", "idx:/does/not/exist", "--out", str(tmp_path / "x")]) == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--epochs", "many"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian chromium + chromium-driver absent")
def test_report_renders_in_headless_chromium(quick_report: Path, tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,2400",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.get((quick_report / "report.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
        )
        assert len(images) >= 6
        assert all(done and width > 100 for _, done, width in images), images
        # nothing runs past a 1280 px window: wide tables scroll in their own box
        page, window = driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]"
        )
        assert page <= window, f"page {page} px wide in a {window} px window"
        overflowing = driver.execute_script(
            "return Array.from(document.querySelectorAll('body *'))"
            ".filter(e => e.getBoundingClientRect().right > window.innerWidth + 1"
            " && !e.closest('.scroll')).map(e => e.tagName + ' ' + e.className)"
        )
        assert overflowing == [], overflowing
        sections = driver.execute_script(
            "return Array.from(document.querySelectorAll('h2[id]')).map(h => h.id)"
        )
        assert {"throughput", "layer_stats", "small_batch"} <= set(sections), sections
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        driver.save_screenshot(str(quick_report / "screenshot.png"))
    finally:
        driver.quit()
