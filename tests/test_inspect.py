"""`sae inspect`: planted latents give exactly their examples, maxima and densities; the streaming
top-k equals a brute-force top-k on real activations; gated rows are never examples; the sample is
uniform; the page works in a real browser from file://; bad input is one line."""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sae.cache.store import open_cache
from sae.inspect.config import InspectConfig
from sae.inspect.effects import final_norm, nearest_latents, norm_gain
from sae.inspect.page import summary, write_page
from sae.inspect.scan import Scanner, plan_rows, scan
from sae.inspect.stage import inspect_data, inspect_pipeline_runs
from sae.train.config import SAESpec
from sae.train.gate import Gate, chunk_rows
from sae.train.rundir import cache_record, load_sae, read_run, run_cfg, save_run
from sae.train.sae import SparseAutoencoder
from tests.synthetic import write_cache
from tests.test_cli import run_sae
from tests.test_evaluate import cache_path, data, random_sae  # noqa: F401  (module fixtures)

T, C, CHUNK = 16, 24, 4  # planted cache: 24 contexts of 16 tokens, 4 contexts a chunk
HELDOUT = [2, 3, 4, 5]  # contexts 8..23
ARCHS = ("relu", "batchtopk", "jumprelu", "topk")


# -- helpers ----------------------------------------------------------------------------------------
def save_with_heldout(run_dir: Path, sae: SparseAutoencoder, cache: Path, chunks: list[int], layer: int) -> Path:
    """A run dir as `sae train` writes it, with its held-out chunks recorded."""
    run_dir.mkdir(parents=True)
    save_run(run_dir, sae, run_cfg(sae, cache_record(open_cache(cache), layer), {"heldout": {"chunks": chunks}}))
    return run_dir


def planted_value(c: int, p: int) -> float:
    """Even positions: rising with the context; odd ones: the same in every context (ties)."""
    return c / 4 + p / 2 + 1 if p % 2 == 0 else 2 + p / 2


def planted_sae(arch: str) -> SparseAutoencoder:
    """Latent j reads dimension j (= position j, = token j + 1); latents T and T + 1 never fire."""
    sae = SparseAutoencoder(SAESpec(arch, 1, T + 2, 0.0, 0.0), T)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, :T] = torch.eye(T)
        sae.b_enc.zero_()
        sae.b_enc[T:] = -1
        sae.W_dec.copy_(torch.cat([torch.eye(T), torch.full((2, T), T**-0.5)]))
        sae.b_dec.zero_()
        if arch == "jumprelu":
            sae.log_threshold.fill_(math.log(0.5))
        if arch == "batchtopk":
            sae.theta.fill_(0.5)
    sae.gate = Gate(bos_token_id=0)  # the first position holds BOS: latent 0 never sees an ungated row
    return sae


@pytest.fixture(scope="module")
def planted_cache(tmp_path_factory) -> Path:
    acts = torch.zeros(C * T, T)
    for c in range(C):
        for p in range(T):
            acts[c * T + p, p] = planted_value(c, p)
    return write_cache(tmp_path_factory.mktemp("planted"), acts, T, CHUNK)


# -- exactness ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, queue", [(arch, None) for arch in ARCHS] + [("relu", 0.02)])
def test_planted_latents_give_exactly_their_examples_maxima_and_densities(arch, queue, planted_cache, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    if queue:  # merges every few entries, ties among them
        monkeypatch.setattr("sae.inspect.scan.QUEUE", queue)
    run_dir = save_with_heldout(tmp_path / arch, planted_sae(arch), planted_cache, HELDOUT, 0)
    cfg = InspectConfig(top=5, sample_size=32, quantile_pool=32, batch_rows=2 * T, lm=False, device="cpu")
    found = inspect_data(read_run(run_dir), cfg)
    contexts = range(8, 24)
    assert found["source"] == {"kind": "heldout", "chunks": HELDOUT, "row_ranges": [[8 * T, 24 * T]],
                              "rows": 16 * T, "rows_gated": 16}  # fmt: skip
    latents = found["latents"]
    assert [j for j, r in enumerate(latents) if r["dead"]] == [0, T, T + 1]  # 0: only on gated BOS rows
    for j in range(1, T):
        record, values = latents[j], [planted_value(c, j) for c in contexts]
        assert record["count"] == 16 and record["density"] == 1 / T and not record["dense"]
        assert record["max_activation"] == max(values)
        assert record["mean_activation"] == pytest.approx(np.mean(values), rel=1e-3)
        # ties (odd j) go to the lower row
        best = sorted(contexts, key=lambda c: (-planted_value(c, j), c))[:5]
        assert [e["row"] for e in record["top"]] == [c * T + j for c in best]
        assert [e["activation"] for e in record["top"]] == [planted_value(c, j) for c in best]
        for e in record["top"]:
            start = max(0, j - cfg.window_before)
            assert e["tokens"] == [f"[{p + 1 if p else 0}]" for p in range(start, min(T, j + cfg.window_after + 1))]
            assert e["at"] == j - start and e["context"] * T + e["position"] == e["row"]
            assert e["activations"] == [e["activation"] if i == e["at"] else 0 for i in range(len(e["tokens"]))]
        # the sample holds all 16 rows, so the quantile picks are exact
        picks = [math.floor((i + 0.5) / 10 * 16) for i in range(10)]
        assert [e["activation"] for e in record["quantiles"]] == [sorted(values)[i] for i in picks]
        assert sum(record["histogram"]["counts"]) == 16 and record["histogram"]["edges"][-1] == max(values)


def test_a_small_sample_is_a_subset_without_repeats(planted_cache, tmp_path):
    run_dir = save_with_heldout(tmp_path / "relu", planted_sae("relu"), planted_cache, HELDOUT, 0)
    found = inspect_data(
        read_run(run_dir), InspectConfig(sample_size=6, quantile_pool=4, quantile_samples=3, lm=False, device="cpu")
    )
    for j in range(1, T):
        q = found["latents"][j]["quantiles"]
        assert len(q) == 3 and len({e["row"] for e in q}) == 3
        assert all(8 <= e["context"] < 24 and e["position"] == j for e in q)
        assert [e["activation"] for e in q] == sorted(e["activation"] for e in q)
        assert sum(found["latents"][j]["histogram"]["counts"]) == 6


def test_the_sample_is_uniform_over_the_active_rows():
    """Keeping the S smallest random keys: each of n active rows is in the sample with probability S/n,
    and in its pool (the P smallest keys, whose windows are kept) with probability P/n."""
    sae = SparseAutoencoder(SAESpec("relu", 1, 1, 0.0, 0.0), 1)
    with torch.no_grad():
        sae.W_enc.fill_(1), sae.b_enc.zero_(), sae.W_dec.fill_(1), sae.b_dec.zero_()
    acts = 1 + torch.arange(40.0)[:, None]  # 10 contexts of 4 rows, all active, rising
    seeds, S, P = 300, 10, 5
    included, pooled = np.zeros(40), np.zeros(40)
    for seed in range(seeds):
        cfg = InspectConfig(sample_size=S, quantile_pool=P, top=1, quantile_samples=1, seed=seed)
        scanner = Scanner(sae, cfg, 4, torch.device("cpu"))
        for c in range(10):
            scanner.update(acts[4 * c : 4 * c + 4], torch.ones(4, dtype=torch.long), 4 * c)
        sample = scanner.result().sample
        rows = sample.row_MK[0]
        assert len(set(rows.tolist())) == S
        included[rows] += 1
        pooled[rows[:P]] += 1
        assert (sample.window_MPW[0, :, cfg.window_before] == 1 + rows[:P]).all()  # the row's own activation
    assert np.abs(included / seeds - S / 40).max() < 0.1  # 4 standard errors
    assert np.abs(pooled / seeds - P / 40).max() < 0.08


@pytest.mark.parametrize(
    "arch, queue", [("batchtopk", None), ("jumprelu", None), ("topk", None), ("relu", None), ("relu", 0.01)]
)
def test_streaming_top_k_equals_brute_force_on_real_activations(arch, queue, cache_path, monkeypatch):  # noqa: F811
    if queue:  # merge every few entries: the stale bar between merges is exercised
        monkeypatch.setattr("sae.inspect.scan.QUEUE", queue)
    cache = open_cache(cache_path)
    sae = random_sae(arch, 4, 64, seed=1)
    x = torch.cat([cache.read_acts(1, c) for c in range(cache.n_chunks)]).float()
    if arch == "jumprelu":  # a θ of its own per latent: each latent's pre-activations at a random quantile
        with torch.no_grad():
            levels_M = torch.rand(sae.m, generator=torch.Generator().manual_seed(3)) * 0.45 + 0.5
            sae.log_threshold.copy_(sae.pre_acts(x).quantile(levels_M, dim=0).diagonal().clamp(min=1e-3).log())
    cfg = InspectConfig(top=8, sample_size=16, quantile_pool=6, quantile_samples=3, batch_rows=64, lm=False)
    result = scan(sae, cache, 1, plan_rows(cache, [], cache.rows), cfg, torch.device("cpu"))
    with torch.no_grad():
        latents = sae.encode(x).numpy()
    assert result.rows == len(x) and (result.count_M == (latents > 0).sum(0)).all()
    assert (result.max_M == latents.max(0)).all()
    np.testing.assert_allclose(result.sum_M, latents.astype(np.float64).sum(0), rtol=1e-5)
    rows = np.arange(len(x))
    offsets = np.arange(-cfg.window_before, cfg.window_after + 1)
    for j in range(sae.m):
        active = rows[latents[:, j] > 0]
        best = active[np.lexsort((active, -latents[active, j]))][: cfg.top]  # highest first, ties: lower row
        kept = result.top.row_MK[j][result.top.row_MK[j] >= 0]
        assert kept.tolist() == best.tolist()
        assert (result.top.value_MK[j, : len(best)] == latents[best, j]).all()
        sampled = result.sample.row_MK[j][result.sample.row_MK[j] >= 0]
        assert len(sampled) == min(len(active), cfg.sample_size) and set(sampled) <= set(active)
        # windows, of the top examples and of the sample's pool: this latent's activations around the row
        for table, shown in ((result.top, best[:3]), (result.sample, sampled[: cfg.quantile_pool])):
            for slot, row in enumerate(shown):
                at = row + offsets
                inside = (at // cache.ctx_len == row // cache.ctx_len) & (at >= 0) & (at < len(x))
                expected = np.where(inside, latents[np.clip(at, 0, len(x) - 1), j], 0)
                np.testing.assert_allclose(table.window_MPW[j, slot], expected, rtol=1e-2)  # bfloat16


def test_gated_rows_never_appear_as_examples(cache_path):  # noqa: F811
    cache = open_cache(cache_path)
    sae = random_sae("relu", 4, 64, seed=2)  # relu: nearly every latent active on nearly every row
    x = torch.cat([cache.read_acts(1, c) for c in range(cache.n_chunks)]).float()
    tokens, positions = (
        torch.cat(parts) for parts in zip(*(chunk_rows(cache, c) for c in range(cache.n_chunks)), strict=True)
    )
    sae.gate = Gate(cache.spec["bos_token_id"], True, 1.0, float(x.norm(dim=1).quantile(0.8)))
    gated = sae.gate.gated(x, tokens, positions).numpy()
    assert 0 < gated.sum() < len(gated)
    result = scan(sae, cache, 1, plan_rows(cache, [], cache.rows), InspectConfig(top=30, lm=False), torch.device("cpu"))
    assert result.rows_gated == gated.sum()
    for kept in (result.top, result.sample):
        rows = kept.row_MK[kept.row_MK >= 0]
        assert len(rows) and not gated[rows].any()
    with torch.no_grad():
        latents = sae.encode(x).numpy()
    assert (result.count_M == (latents[~gated] > 0).sum(0)).all()


# -- the command, the LM's token effects, the page ------------------------------------------------------
def calibrated_batchtopk(path: Path) -> SparseAutoencoder:
    """A random BatchTopK SAE whose θ gives L0 = 4 on the cache, as training would calibrate it."""
    from sae.train.theta import calibrate_theta

    cache, sae = open_cache(path), random_sae("batchtopk", 4, 64)
    with torch.no_grad():
        sae.theta.fill_(calibrate_theta(sae, [cache.read_acts(1, 0).float()], 4)["theta"])
    return sae


@pytest.fixture(scope="module")
def inspected(cache_path, tmp_path_factory) -> tuple[Path, dict]:  # noqa: F811
    """A BatchTopK run on the tiny GPT-2 cache, inspected by `sae inspect` (the LM loaded)."""
    run_dir = save_with_heldout(
        tmp_path_factory.mktemp("runs") / "btk", calibrated_batchtopk(cache_path), cache_path, [1], 1
    )
    found = inspect_data(read_run(run_dir), InspectConfig(device="cpu"))
    return write_page(run_dir / "inspect", found), found


def test_token_effects_and_neighbours(inspected, cache_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    page, found = inspected
    assert found["source"]["rows"] == 8 * 32 and found["cache"]["layer"] == 1
    model = AutoModelForCausalLM.from_pretrained(open_cache(cache_path).spec["model"]).eval()
    sae = load_sae(page.parent.parent)
    gain = model.transformer.ln_f.weight  # GPT-2's final LayerNorm gain, read directly
    assert torch.allclose(norm_gain(final_norm(model), 32, torch.device("cpu")), gain, atol=1e-6)
    with torch.no_grad():
        logits = (sae.W_dec * gain) @ model.lm_head.weight.T
        dirs = torch.nn.functional.normalize(sae.W_dec, dim=1)
        nearest = (dirs @ dirs.T).fill_diagonal_(-torch.inf).topk(5).indices  # all [m, m] at once: m = 64
    for j, record in enumerate(found["latents"]):
        assert [t["id"] for t in record["promoted"]] == logits[j].topk(10).indices.tolist()
        assert [t["id"] for t in record["suppressed"]] == logits[j].topk(10, largest=False).indices.tolist()
        assert [n["id"] for n in record["neighbours"]] == nearest[j].tolist()
        assert all(e["text"] and len(e["tokens"]) == len(e["activations"]) for e in record["top"])
    assert nearest_latents(sae.W_dec.detach(), 5).ids_MK.tolist() == nearest.tolist()


def test_sae_inspect_command_and_latent_card(inspected, monkeypatch, capsys):
    page, found = inspected
    run_dir = page.parent.parent
    live = next(r for r in found["latents"] if r["top"])
    stamp = (page.parent / "latents.json").stat().st_mtime_ns
    code, out, err = run_sae(
        monkeypatch, capsys, "inspect", str(run_dir), "--latent", str(live["id"]), "--device", "cpu"
    )
    assert code == 0, err
    assert f"latent {live['id']}" in out and "top activations" in out and "promoted" in out
    assert (page.parent / "latents.json").stat().st_mtime_ns == stamp  # reused: same weights, cache and settings
    code, out, err = run_sae(
        monkeypatch, capsys, "inspect", str(run_dir), "--out", str(run_dir / "again"), "--device", "cpu"
    )
    assert code == 0 and out.strip() == str(run_dir / "again" / "index.html"), err
    saved = json.loads((run_dir / "again" / "latents.json").read_text())
    assert saved["latents"] == found["latents"] and "rows" in err  # the progress bar (stderr)
    listing = script_data(run_dir / "again" / "latents.js", "window.SAE_INSPECT = ")
    assert listing["source"] == saved["source"] and [r["id"] for r in listing["latents"]] == list(range(64))
    assert listing["latents"][live["id"]]["fires"][0] == live["top"][0]["tokens"][live["top"][0]["at"]]
    assert (
        script_data(run_dir / "again" / "cards" / "0000.js", "SAE_CARDS(0, ") == saved["latents"]
    )  # m = 64: one shard


def script_data(path: Path, prefix: str):
    """The JSON a page script hands over: `<prefix>{...});` or `<prefix>{...};`."""
    text = path.read_text()
    assert text.startswith(prefix)
    return json.loads(text[len(prefix) :].rstrip().rstrip(";").rstrip(")"))


def test_sae_run_inspects_its_batchtopk_run(inspected, cache_path, tmp_path):  # noqa: F811
    topk = save_with_heldout(tmp_path / "topk", random_sae("topk", 4, 64), cache_path, [1], 1)
    btk = save_with_heldout(tmp_path / "btk", random_sae("batchtopk", 4, 64), cache_path, [1], 1)
    page = inspect_pipeline_runs([topk, btk], InspectConfig())
    assert page == btk / "inspect" / "index.html" and page.exists() and not (topk / "inspect").exists()


# -- bad input: one line, non-zero exit -----------------------------------------------------------------
def one_line_error(monkeypatch, capsys, *args) -> str:
    code, out, err = run_sae(monkeypatch, capsys, "inspect", *map(str, args), "--device", "cpu")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input_is_one_line(planted_cache, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    assert "no saved SAE in" in one_line_error(monkeypatch, capsys, tmp_path / "empty")
    moved = tmp_path / "moved-cache"
    shutil.copytree(planted_cache, tmp_path / "cache")
    run_dir = save_with_heldout(tmp_path / "run", planted_sae("relu"), tmp_path / "cache", HELDOUT, 0)
    (tmp_path / "cache").rename(moved)
    err = one_line_error(monkeypatch, capsys, run_dir, "--no-lm")
    assert "is not there; give its path with --cache" in err
    err = one_line_error(monkeypatch, capsys, run_dir, "--cache", moved, "--latent", T + 2)
    assert f"latent {T + 2} out of range: run {run_dir} has latents 0..{T + 1}" in err
    assert "--no-lm" in one_line_error(monkeypatch, capsys, run_dir, "--cache", moved)  # synthetic-d16: no model
    assert "exceeds the 384 rows" in one_line_error(monkeypatch, capsys, run_dir, "--cache", moved, "--tokens", "1e6")
    assert "top must be positive" in one_line_error(monkeypatch, capsys, run_dir, "--top", 0)
    code, out, err = run_sae(
        monkeypatch, capsys, "inspect", str(run_dir), "--cache", str(moved), "--no-lm", "--latent", "3"
    )
    assert code == 0 and "latent 3" in out, err


# -- the page in a real browser -----------------------------------------------------------------------
# Debian's packages (.ci/install), found on PATH or at their Debian paths
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")


def chromium(user_data_dir: Path, window: tuple[int, int] = (1400, 900)):
    """Headless Chromium through selenium; skips without it, unless SAE_REQUIRE_BROWSER=1 (CI) fails."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if webdriver is None or not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        why = "chromium, chromium-driver and selenium are needed (bash .ci/install installs them)"
        if os.environ.get("SAE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SAE_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={user_data_dir}", f"--window-size={window[0]},{window[1]}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def browse(page: Path, latent: int, user_data_dir: Path, screenshot: Path | None = None, token: str = "",
           window: tuple[int, int] = (1400, 900)) -> dict:  # fmt: skip
    """Open the page from file://, search the latent's id, open its card, search a token, then sort
    the list by max activation; what the page shows. (docs/inspect.png: a window of 1400 × 1550.)"""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(user_data_dir, window)
    try:
        driver.get(page.resolve().as_uri())
        search = driver.find_element(By.ID, "search")
        search.send_keys(str(latent))
        listed = [tr.get_attribute("data-id") for tr in driver.find_elements(By.CSS_SELECTOR, "tr.latent-row")]
        driver.find_element(By.CSS_SELECTOR, f'tr.latent-row[data-id="{latent}"]').click()
        card = driver.find_element(By.ID, "card")  # filled once its cards/NNNN.js has loaded
        WebDriverWait(driver, 10).until(lambda _: card.find_elements(By.CSS_SELECTOR, ".ctx"))
        contexts = [e.get_attribute("textContent") for e in card.find_elements(By.CSS_SELECTOR, ".ctx")]
        title = card.find_element(By.TAG_NAME, "h2").text
        search.send_keys(Keys.CONTROL, "a", Keys.NULL, Keys.BACKSPACE, token)  # NULL: release Ctrl
        by_token = [tr.get_attribute("data-id") for tr in driver.find_elements(By.CSS_SELECTOR, "tr.latent-row")]
        search.send_keys(Keys.CONTROL, "a", Keys.NULL, Keys.BACKSPACE)
        driver.find_element(By.CSS_SELECTOR, 'th[data-key="max_activation"]').click()
        first_by_max = driver.find_element(By.CSS_SELECTOR, "tr.latent-row").get_attribute("data-id")
        if screenshot is not None:
            driver.save_screenshot(str(screenshot))
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        return {"listed": listed, "contexts": contexts, "title": title, "by_token": by_token, "first_by_max": first_by_max,
                "errors": errors}  # fmt: skip
    finally:
        driver.quit()


def test_the_page_in_headless_chromium(inspected, tmp_path):
    page, found = inspected
    # the busiest latent whose top example fires on a word (typing "\n" into the search box is Enter)
    worded = [r for r in found["latents"] if r["top"] and r["top"][0]["tokens"][r["top"][0]["at"]].strip().isalpha()]
    latent = max(worded, key=lambda r: r["count"])
    token = latent["top"][0]["tokens"][latent["top"][0]["at"]].strip()
    seen = browse(page, latent["id"], tmp_path / "profile", tmp_path / "page.png", token)
    assert seen["errors"] == []
    assert seen["listed"] == [str(latent["id"])] and seen["title"].startswith(f"Latent {latent['id']}")
    assert seen["contexts"][0] == "".join(latent["top"][0]["tokens"]).replace("\n", "↵")
    summaries = [summary(r) for r in found["latents"]]  # what the list searches: fired-on and promoted tokens
    expected = {str(r["id"]) for r in summaries if token.lower() in "\0".join(r["fires"] + r["promoted"]).lower()}
    assert str(latent["id"]) in seen["by_token"] and set(seen["by_token"]) == expected
    assert seen["first_by_max"] == str(max(found["latents"], key=lambda r: (r["max_activation"], -r["id"]))["id"])
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
