"""`sae inspect RUN --latent J`: one latent's card in the terminal (rich), from its latents.json record.
The same content as the page's card: stats, contexts with each token shaded by the activation,
histogram, token effects, nearest latents."""

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

BARS = " ▁▂▃▄▅▆▇█"


def fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def shaded(example: dict, max_activation: float) -> Text:
    """The example's tokens on a white-to-orange background by activation; its own token underlined."""
    text = Text()
    for i, (token, act) in enumerate(zip(example["tokens"], example["activations"], strict=True)):
        style = ""
        if act > 0:
            level = min(1.0, act / (max_activation or 1))  # the page's rgba(255, 112, 0, level) on white
            style = f"black on rgb(255,{round(255 - 143 * level)},{round(255 - 255 * level)})"
        if i == example["at"]:
            style += " bold underline"
        text.append(token.replace("\n", "↵"), style=style.strip())
    return text


def examples_table(examples: list[dict], max_activation: float, quantiles: bool) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(justify="right", style="cyan", no_wrap=True)
    if quantiles:
        table.add_column(style="dim", no_wrap=True)
    table.add_column()
    for e in examples:
        table.add_row(
            fmt(e["activation"]), *([f"q {e['quantile']:.2f}"] if quantiles else []), shaded(e, max_activation)
        )
    return table


def histogram(h: dict | None) -> Text:
    if h is None:
        return Text("never active", style="dim")
    top = max(h["counts"]) or 1
    bars = "".join(BARS[round(c / top * (len(BARS) - 1))] for c in h["counts"])
    return Text.assemble("0 ", (bars, "dark_orange"), f" {fmt(h['edges'][-1])}")


def tokens_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title, show_header=False, box=None, title_justify="left")
    for row in rows:
        table.add_row(repr(row["token"])[1:-1], fmt(row["logit"]))
    if not rows:
        table.add_row(Text("no LM (--no-lm)", style="dim"))
    return table


def card(data: dict, latent: int) -> Panel:
    record, rows = data["latents"][latent], data["source"]["rows"]
    flags = " ".join(f for f in ("dead" if record["dead"] else "", "dense" if record["dense"] else "") if f)
    stats = Text.assemble(
        f"density {fmt(100 * record['density'])}% ({record['count']:,} of {rows:,} rows)",
        f" · max {fmt(record['max_activation'])} · mean when active {fmt(record['mean_activation'])}",
        (f"  {flags}" if flags else "", "bold red"),
    )
    neighbours = Text(", ".join(f"{n['id']} ({n['cosine']:.2f})" for n in record["neighbours"]))
    effects = Table.grid(padding=(0, 4))
    effects.add_row(tokens_table("promoted", record["promoted"]), tokens_table("suppressed", record["suppressed"]))
    parts = [stats, Text("\ntop activations", style="bold")]
    parts.append(examples_table(record["top"], record["max_activation"], False) if record["top"] else Text("none"))
    if record["quantiles"]:
        parts += [
            Text("\nacross its activations", style="bold"),
            examples_table(record["quantiles"], record["max_activation"], True),
        ]
    parts += [Text("\nhistogram (sample) ", style="bold") + histogram(record["histogram"]), Text(""), effects]
    parts += [Text("\nnearest latents (decoder cosine) ", style="bold") + neighbours]
    return Panel(Group(*parts), title=f"latent {latent} · {data['run']['name']}", title_align="left")


def print_card(data: dict, latent: int) -> None:
    Console().print(card(data, latent))  # stdout: the card is this command's result
