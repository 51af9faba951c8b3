"""The output folder of `sae inspect`:

    latents.json        everything (schema: inspect/latents.py), for scripts and `sae inspect --latent`
    index.html          the static page: works from file://, no network
    latents.js          what the list needs: the header and one summary per latent (ids, stats, flags,
                        the tokens it fires on and promotes, for search)
    cards/NNNN.js       the full records of latents NNNN·256 … NNNN·256 + 255, loaded when a card opens

Chromium blocks fetch() of local files under file://, so the page reads scripts, which assign their
data to globals. Splitting the cards keeps the page quick at any dictionary size: latents.json is
≈ 11 kB a latent with the defaults (52 MB at m = 4608), the list ≈ 0.3 kB.
"""

import json
from pathlib import Path

from sae.errors import UserError
from sae.inspect.template import INDEX_HTML
from sae.train.rundir import atomic_write

SHARD = 256  # latents per cards/ file
FIRES_ON = 8  # distinct tokens of its top examples listed per latent


def summary(record: dict) -> dict:
    """A latent as the list shows and searches it."""
    fires = list(dict.fromkeys(e["tokens"][e["at"]] for e in record["top"]))[:FIRES_ON]
    keep = ("id", "count", "density", "max_activation", "mean_activation", "dead", "dense")
    return {**{k: record[k] for k in keep}, "fires": fires, "promoted": [p["token"] for p in record["promoted"]]}


def write_script(path: Path, prefix: str, obj, suffix: str) -> None:
    # ASCII-only JSON: the script's text is then the same whatever charset a browser assumes
    atomic_write(path, lambda f: f.write(f"{prefix}{json.dumps(obj, separators=(',', ':'))}{suffix}\n".encode()))


def write_page(out: Path, data: dict) -> Path:
    """Write latents.json, the page and its scripts into `out` (created); returns index.html's path."""
    out = Path(out)
    try:
        (out / "cards").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}; choose another --out") from None
    atomic_write(out / "latents.json", lambda f: f.write(json.dumps(data, separators=(",", ":")).encode()))
    latents = data["latents"]
    names = []
    for shard, start in enumerate(range(0, len(latents), SHARD)):
        names.append(f"{shard:04d}.js")
        write_script(out / "cards" / names[-1], f"SAE_CARDS({shard}, ", latents[start : start + SHARD], ");")
    for stale in (out / "cards").glob("[0-9][0-9][0-9][0-9].js"):  # from an earlier, larger run
        if stale.name not in names:
            stale.unlink()
    listing = {**{k: v for k, v in data.items() if k != "latents"}, "shard_size": SHARD}
    listing["latents"] = [summary(record) for record in latents]
    write_script(out / "latents.js", "window.SAE_INSPECT = ", listing, ";")
    atomic_write(out / "index.html", lambda f: f.write(INDEX_HTML.encode()))
    return out / "index.html"
