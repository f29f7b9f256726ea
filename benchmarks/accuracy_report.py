"""Summaries, target checks, Markdown and plots of the accuracy benchmark (``benchmarks/accuracy.py``).

Everything here reads the results dictionary that ``accuracy.json`` holds, so a report can be rebuilt from the JSON
alone (``python -m benchmarks.accuracy --report-only --out DIR``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

NOTES = Path(__file__).resolve().parent / "accuracy_notes.md"
SESSIONS_PNG = "accuracy_sessions.png"
SCATTER_PNG = "accuracy_ti_cc.png"
B2N_PNG = "accuracy_b2n.png"
TRADEOFF_PNG = "accuracy_tradeoff.png"


# ------------------------------------------------------------------------------------------------------------ stats


def mean_std(values: Sequence[float]) -> list[float]:
    """``[mean, sample std]`` (std 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return [mean, std]


def summarize_continual(entry: dict, columns: list[str]) -> dict:
    runs = entry["runs"]
    n_rows = len(runs[0]["rows"])
    rows = [[mean_std([run["rows"][i][j] for run in runs]) for j in range(len(columns))] for i in range(n_rows)]
    return {
        "rows": rows,  # rows[session][column] = [mean, std]
        "target_final": rows[-1][0],
        "controls_final": {c: rows[-1][j] for j, c in enumerate(columns) if j > 0},
        "target_improvement": mean_std([run["target_improvement"] for run in runs]),
        "control_change": mean_std([run["control_change"] for run in runs]),
        "trainable_params": max(run["trainable_params"] for run in runs),
        "seconds": mean_std([run["seconds"] for run in runs]),
        "train_seconds": mean_std([run["train_seconds"] for run in runs]),
        "seeds": [run["seed"] for run in runs],
    }


def summarize_b2n(entry: dict) -> dict:
    runs = entry["runs"]
    return {
        "base": mean_std([run["base"] for run in runs]) if "base" in runs[0] else None,
        "new": mean_std([run["new"] for run in runs]) if "new" in runs[0] else None,
        "harmonic": mean_std([run["harmonic"] for run in runs]) if "harmonic" in runs[0] else None,
        "trainable_params": max(run["trainable_params"] for run in runs),
        "train_seconds": mean_std([run["train_seconds"] for run in runs]),
        "seeds": [run["seed"] for run in runs],
    }


def summarize(results: dict) -> None:
    """Add a ``summary`` to every method entry and the ``targets`` checks (in place)."""
    for setting in results["continual"]:
        for entry in setting["methods"].values():
            entry["summary"] = summarize_continual(entry, setting["columns"])
            if "balanced" in entry:
                entry["balanced"]["summary"] = summarize_continual(entry["balanced"], setting["columns"])
    for setting in results["base_to_new"]:
        for entry in setting["methods"].values():
            entry["summary"] = summarize_b2n(entry)
    results["targets"] = check_targets(results)


# ------------------------------------------------------------------------------------------------------------ targets


RULES = {"headline": "lr by target validation accuracy", "balanced": "lr by TI_val + CC_val"}


def _get(setting: dict, method: str, rule: str = "headline") -> dict | None:
    """The summary of ``method`` at the lr of ``rule`` (zero-shot and base-to-new rows have one rule only)."""
    entry = setting["methods"].get(method)
    if entry is None:
        return None
    return entry["balanced"]["summary"] if rule == "balanced" and "balanced" in entry else entry["summary"]


def check_targets(results: dict) -> list[dict]:
    """The targets of issue 11: ``{"setting", "selection", "target", "met", "detail"}`` per setting and lr rule."""
    checks = []
    for setting in results["continual"]:
        rules = ["headline"] + (["balanced"] if "balanced" in setting["methods"].get("lorsu", {}) else [])
        for rule in rules:
            checks += _continual_checks(setting, rule)
    for setting in results["base_to_new"]:
        rlp, coop = _get(setting, "rlp"), _get(setting, "coop")
        if rlp and coop and rlp["harmonic"] and coop["harmonic"]:
            h, h_coop = rlp["harmonic"][0], coop["harmonic"][0]
            p, p_coop = rlp["trainable_params"], coop["trainable_params"]
            checks.append(
                _check(
                    f"base-to-new {setting['dataset']}, context '{setting.get('init_text', '')}'",
                    "RLP H >= CoOp H with <= 1/4 of its parameters",
                    h >= h_coop and 4 * p <= p_coop,
                    f"H {100 * h:.1f} vs {100 * h_coop:.1f}; params {p:,} vs {p_coop:,}",
                )
            )
    return checks


def _continual_checks(setting: dict, rule: str) -> list[dict]:
    label = f"{setting['target']}, {setting['shots']}-shot"
    checks = []
    lorsu, full, lora = (_get(setting, m, rule) for m in ("lorsu", "full", "lora"))
    if lorsu and full:
        ti, ti_full = lorsu["target_improvement"][0], full["target_improvement"][0]
        ratio = ti / ti_full if ti_full > 0 else float("nan")
        checks.append(
            _check(
                label,
                "LoRSU TI >= 90% of full fine-tuning's TI",
                ti_full > 0 and ratio >= 0.9,
                f"TI {100 * ti:.1f} vs {100 * ti_full:.1f} pts ({100 * ratio:.0f}%)",
            )
        )
    if lorsu and full and lora:
        cc, cc_lora, cc_full = (s["control_change"][0] for s in (lorsu, lora, full))
        checks.append(
            _check(
                label,
                "LoRSU CC better than LoRA's and full fine-tuning's",
                cc > cc_lora and cc > cc_full,
                f"CC {100 * cc:+.1f} vs LoRA {100 * cc_lora:+.1f}, full {100 * cc_full:+.1f} pts",
            )
        )
    if lorsu and lora:
        p, p_lora = lorsu["trainable_params"], lora["trainable_params"]
        checks.append(
            _check(
                label,
                "LoRSU has fewer trainable parameters than LoRA (same rank)",
                p < p_lora,
                f"{p:,} vs {p_lora:,}",
            )
        )
    for random_name in ("lorsu_random", "lorsu_random_heads"):
        rand = _get(setting, random_name, rule)
        if lorsu and rand:
            ti, ti_rand = lorsu["target_improvement"], rand["target_improvement"]
            checks.append(
                _check(
                    label,
                    f"gradient heads beat random heads on TI (vs {random_name})",
                    ti[0] > ti_rand[0],
                    f"TI {100 * ti[0]:.1f} ± {100 * ti[1]:.1f} vs {100 * ti_rand[0]:.1f} ± "
                    f"{100 * ti_rand[1]:.1f} pts at {lorsu['trainable_params']:,} / "
                    f"{rand['trainable_params']:,} params",
                )
            )
    for check in checks:
        check["selection"] = rule
    return checks


def _check(setting: str, target: str, met: bool, detail: str) -> dict:
    return {"setting": setting, "selection": "headline", "target": target, "met": bool(met), "detail": detail}


# ------------------------------------------------------------------------------------------------------------ markdown


def pct(ms: Sequence[float] | None, signed: bool = False) -> str:
    if ms is None:
        return "-"
    sign = "+" if signed else ""
    return f"{100 * ms[0]:{sign}.1f} ± {100 * ms[1]:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def continual_section(setting: dict, results: dict) -> list[str]:
    columns = setting["columns"]
    controls = columns[1:]
    lines = [f"### {setting['target']}, {setting['shots']} shots per class per session", ""]
    header = [
        "method",
        "trainable params",
        "lr",
        "target acc",
        *[f"{c} acc" for c in controls],
        "TI",
        "CC",
        "train s / run",
    ]
    rows = []
    for name, entry in setting["methods"].items():
        s = entry["summary"]
        rows.append(
            [
                *_lead_cells(name, entry),
                pct(s["target_final"]),
                *[pct(s["controls_final"][c]) for c in controls],
                pct(s["target_improvement"], signed=True),
                pct(s["control_change"], signed=True),
                f"{s['train_seconds'][0]:.1f}",
            ]
        )
    lines += _table(header, rows)
    zero = setting["methods"].get("zero_shot")
    if zero:
        base = zero["summary"]["rows"][0]
        lines += ["", "Zero-shot: " + ", ".join(f"{c} {100 * base[j][0]:.1f}%" for j, c in enumerate(columns)) + "."]
    balanced = [(n, e) for n, e in setting["methods"].items() if "balanced" in e]
    if balanced:
        lines += ["", "Balanced lr rule (lr by TI_val + CC_val on validation data; same seeds):", ""]
        rows = []
        for name, entry in balanced:
            s = entry["balanced"]["summary"]
            rows.append(
                [
                    f"`{name}`",
                    f"{entry['balanced']['lr']:g}",
                    pct(s["target_final"]),
                    *[pct(s["controls_final"][c]) for c in controls],
                    pct(s["target_improvement"], signed=True),
                    pct(s["control_change"], signed=True),
                ]
            )
        lines += _table(["method", "lr", "target acc", *[f"{c} acc" for c in controls], "TI", "CC"], rows)
    lines += ["", "Target accuracy (%) after each session (headline rule, mean over seeds; 0 = zero-shot):", ""]
    n_rows = max(len(e["summary"]["rows"]) for e in setting["methods"].values())
    header = ["method", *[str(i) for i in range(n_rows)]]
    rows = [
        [f"`{name}`", *[f"{100 * r[0][0]:.1f}" for r in entry["summary"]["rows"]]]
        for name, entry in setting["methods"].items()
        if len(entry["summary"]["rows"]) == n_rows
    ]
    lines += _table(header, rows)
    return lines + [""]


def lr_section(results: dict) -> list[str]:
    lines = ["## Learning rates", ""]
    plan = results["plan"]
    grids = ", ".join(f"{k}: {', '.join(f'{v:g}' for v in vals)}" for k, vals in plan["grids"].items())
    methods = results["methods"]
    families = {}
    for name, m in methods.items():
        if m["grid"]:
            families.setdefault(m["grid"], []).append(f"`{name}`")
    lines += [
        f"Grids: {grids} ({'; '.join(k + ': ' + ', '.join(v) for k, v in families.items())}). Each value is run "
        f"with seed(s) {', '.join(map(str, plan['selection_seeds']))} on the target's validation split (never its "
        "test split). *Headline rule*: the best target validation accuracy after the last session wins (ties go "
        "to the smaller rate); the final runs use that rate for every seed. *Balanced rule* (continual only, a "
        "second operating point reported next to the headline): the best TI_val + CC_val, where CC_val is measured "
        f"on {plan.get('control_val_per_class', '?')} images per class of each control's *train* split (the "
        "pretraining images, never the control test sets). Base-to-new picks on the *base* classes' validation "
        "images only (new classes stay unseen). Cells: `lr: target validation accuracy % (TI_val + CC_val in "
        "points)`; headline choice in bold, balanced choice marked †:",
        "",
    ]
    rows = []
    for setting in results["continual"]:
        label = f"{setting['target']} {setting['shots']}-shot"
        for name, entry in setting["methods"].items():
            if entry["lr_selection"]:
                rows.append([label, f"`{name}`", _grid_cell(entry["lr_selection"])])
    for setting in results["base_to_new"]:
        for name, entry in setting["methods"].items():
            if entry["lr_selection"]:
                label = f"b2n {setting['dataset']} `{setting.get('init_text', '')}` (base val)"
                rows.append([label, f"`{name}`", _grid_cell(entry["lr_selection"])])
    lines += _table(["setting", "method", "lr: validation accuracy"], rows)
    return lines + [""]


def _lead_cells(name: str, entry: dict) -> list[str]:
    """Method, trainable parameters, chosen learning rate."""
    return [f"`{name}`", f"{entry['summary']['trainable_params']:,}", f"{entry['lr']:g}" if entry["lr"] else "-"]


def _grid_cell(selection: dict) -> str:
    """``lr: target val % (TI_val + CC_val)`` per grid value; headline choice in bold, balanced choice marked †."""
    cells = []
    for lr, acc, *rest in selection["grid"]:
        text = f"{lr:g}: {100 * acc:.1f}"
        if rest and "chosen_balanced" in selection:
            text += f" ({100 * (rest[0] + rest[1]):+.1f})"
        text = f"**{text}**" if lr == selection["chosen"] else text
        cells.append(text + (" †" if lr == selection.get("chosen_balanced") else ""))
    return ", ".join(cells)


def b2n_section(results: dict) -> list[str]:
    plan = results["plan"]
    lines = [
        "## RLP vs CoOp: base-to-new",
        "",
        f"Each dataset's classes are split in two halves (the first ceil(C/2) are *base*). The prompt is trained on "
        f"{plan['b2n_shots']} images per base class (one session, {plan['b2n_epochs']} epochs, batch "
        f"{plan['batch_size']}, class-prompt cross-entropy, context initialised from the text named in each heading); "
        "base accuracy B is "
        "measured among the base classes, new accuracy N among the new classes, H = 2BN / (B + N), on the test split.",
        "",
    ]
    for setting in results["base_to_new"]:
        init = setting.get("init_text", plan["init_text"])
        lines += [f"### {setting['dataset']}, context `{init}` ({len(init.split())} tokens)", ""]
        rows = []
        for name, entry in setting["methods"].items():
            s = entry["summary"]
            rows.append(
                [
                    *_lead_cells(name, entry),
                    pct(s["base"]),
                    pct(s["new"]),
                    pct(s["harmonic"]),
                ]
            )
        lines += _table(["method", "trainable params", "lr", "B", "N", "H"], rows) + [""]
    return lines


def investigation_section(results: dict) -> list[str]:
    studies = results.get("investigation") or []
    if not studies:
        return []
    plan = results["plan"]
    seeds = ", ".join(map(str, plan["investigate_seeds"]))
    lines = [
        "## Investigation (validation data only)",
        "",
        f"Every method below is run over a wider lr grid, {plan['investigate_shots']}-shot, seed(s) {seeds}, and "
        "measured on validation images only: TI on the target's validation split (from its train split) and CC on "
        f"{plan['control_val_per_class']} images per class of each control's *train* split (images seen in "
        "pretraining, which is what a forgetting measure needs and keeps the control test sets untouched). "
        f"Cells: TI_val / CC_val in points. Plot: [trade-off]({TRADEOFF_PNG}).",
        "",
        f"![TI vs CC over the lr grid]({TRADEOFF_PNG})",
        "",
    ]
    for study in studies:
        lines += [f"### {study['target']}, {study['shots']}-shot", ""]
        lines += _grid_table(study, results, lambda pt: f"{100 * pt['ti_val'][0]:.1f} / {100 * pt['cc_val'][0]:+.1f}")
        lines += matched_ti_lines(study)
    return lines


def _grid_table(
    study: dict, results: dict, cell: Callable[[dict], str], last: tuple[str, Callable[[dict], str]] | None = None
) -> list[str]:
    """One row per method of a study, one column per lr of its grid (``cell(point)``); ``last``: the header and
    ``fn(entry)`` of an extra column."""
    variants = results.get("variants", {})
    lrs = sorted({pt["lr"] for e in study["methods"].values() for pt in e["points"]})
    rows = []
    for name, entry in study["methods"].items():
        cells = {pt["lr"]: cell(pt) for pt in entry["points"]}
        desc = variants.get(name, {}).get("description", entry["description"])
        row = [f"`{name}`", desc, f"{entry['trainable_params']:,}", *[cells.get(lr, "") for lr in lrs]]
        rows.append(row + ([last[1](entry)] if last else []))
    header = ["method", "what", "params", *[f"lr {lr:g}" for lr in lrs], *([last[0]] if last else [])]
    return _table(header, rows) + [""]


def b2n_investigation_section(results: dict) -> list[str]:
    """RLP (with and without dropout) vs CoOp base-to-new on validation images, over the wider lr grid."""
    studies = results.get("investigation_b2n") or []
    if not studies:
        return []
    plan = results["plan"]
    lines = [
        "### Base-to-new on validation images: RLP dropout and the lr grid",
        "",
        f"Each prompt method trained on the base classes as in the base-to-new section, then scored on the "
        f"*validation* images of base and new classes (from the train split), seeds "
        f"{', '.join(map(str, plan['investigate_b2n_seeds']))}, context `{plan['init_text']}`. Cells: B / N / H "
        "(%, mean over seeds); last column: the best mean H over the grid ± its std over seeds. Looking at new "
        "classes here is what makes it an investigation: no headline setting is chosen from it.",
        "",
    ]
    for study in studies:
        lines += [f"#### {study['dataset']}", ""]
        lines += _grid_table(
            study,
            results,
            lambda pt: " / ".join(f"{100 * pt[f][0]:.1f}" for f in ("base", "new", "harmonic")),
            ("best H", _best_h),
        )
    return lines


def _best_h(entry: dict) -> str:
    best = max(entry["points"], key=lambda pt: pt["harmonic"][0])
    return f"{pct(best['harmonic'])} (lr {best['lr']:g})"


def cc_at_ti(points: list[dict], level: float) -> float | None:
    """CC_val where the method's TI_val first reaches ``level`` along its lr grid (linear between grid points);
    None if it never does."""
    points = sorted(points, key=lambda pt: pt["lr"])
    if points[0]["ti_val"][0] >= level:
        return points[0]["cc_val"][0]
    for a, b in zip(points, points[1:]):
        ta, tb = a["ti_val"][0], b["ti_val"][0]
        if ta < level <= tb:
            w = (level - ta) / (tb - ta)
            return a["cc_val"][0] + w * (b["cc_val"][0] - a["cc_val"][0])
    return None


def matched_ti_lines(study: dict) -> list[str]:
    """Forgetting at equal target gain: CC_val of every method where its TI_val reaches 90% of full fine-tuning's
    best TI_val (the issue's TI target), read off its validation curve."""
    full = study["methods"].get("full")
    if not full:
        return []
    level = 0.9 * max(pt["ti_val"][0] for pt in full["points"])
    rows = []
    for name, entry in study["methods"].items():
        cc = cc_at_ti(entry["points"], level)
        rows.append([f"`{name}`", "not reached" if cc is None else f"{100 * cc:+.1f}"])
    text = (
        f"Forgetting at equal target gain: CC_val where each method's TI_val first reaches {100 * level:.1f} points "
        "(90% of full fine-tuning's best TI_val), read off its validation curve (linear between grid points):"
    )
    return [text, ""] + _table(["method", f"CC_val at TI_val = {100 * level:.1f}"], rows) + [""]


def targets_section(results: dict) -> list[str]:
    lines = ["## Targets", "", "Comparisons are between means over the seeds.", ""]
    lines[2] += (
        " *headline*: each method at the lr with the best target validation accuracy (the rule of the issue); "
        "*balanced*: at the lr with the best TI_val + CC_val (see Learning rates). Both rules use validation data "
        "only."
    )
    rows = [
        [c["setting"], c.get("selection", "headline"), c["target"], "met" if c["met"] else "**not met**", c["detail"]]
        for c in results["targets"]
    ]
    return lines + _table(["setting", "lr rule", "target", "result", "numbers"], rows) + [""]


def protocol_section(results: dict) -> list[str]:
    plan, data = results["plan"], results["data"]
    disjoint = plan.get("disjoint_classes", True)
    steps = {}
    for setting in results["continual"]:
        n_classes = len(data[setting["target"]]["classes"])
        per_session = n_classes // plan["sessions"] if disjoint else n_classes
        batches = math.ceil(per_session * setting["shots"] / plan["batch_size"])
        steps[f"{setting['target']} {setting['shots']}-shot"] = batches * plan["epochs"]
    if disjoint:
        sessions = (
            f"{plan['sessions']} sessions with disjoint classes (the paper's protocol); a session holds "
            f"{' or '.join(map(str, plan['shots']))} training images of each of its classes"
        )
    else:
        sessions = (
            f"{plan['sessions']} sessions; every session holds {' or '.join(map(str, plan['shots']))} new training "
            "images of *every* class (not the paper's class-disjoint sessions: see the findings below for why)"
        )
    sizes = []
    for name, d in data.items():
        if "pool" in d:
            sizes.append(
                f"`{name}`: {d['pool']} train images to draw sessions from, {d['val']} validation (from "
                f"train), {d['test']} test"
            )
        else:
            sizes.append(f"`{name}`: {d['test']} test images")
    return [
        "## Protocol",
        "",
        f"- Continual few-shot (CL-T, after the LoRSU paper): each target's training images are split into {sessions}"
        ", drawn with the run's seed, never shared between sessions. After every session the "
        "update is merged into the weights and the model is evaluated zero-shot (prompt "
        f"`{plan['init_text']} {{class}}.`) on the target's test images (all of its classes) and on every control.",
        f"- TI = target accuracy after the last session minus zero-shot; CC = mean over controls of the same "
        "difference (negative = forgetting). Means ± sample std over seeds "
        f"{', '.join(map(str, plan['seeds']))}.",
        "- Data: " + "; ".join(sizes) + f". Test and control sets are class-stratified subsamples (at most "
        f"{plan['test_per_class']} / {plan['control_per_class']} images per class, fixed seed) "
        "to keep evaluation cheap.",
        f"- Optimisation, identical for every method: AdamW, constant lr (per method, see below), no weight decay, "
        f"batch {plan['batch_size']}, {plan['epochs']} epochs per session: "
        + ", ".join(f"{k}: {n} optimizer steps per session" for k, n in steps.items())
        + f". Vision methods use CLIP's contrastive loss on template captions (`loss={plan['loss']!r}`, the paper's); "
        "RLP / CoOp train the text context with the class-prompt cross-entropy and keep it across sessions."
        + (JOINT_PROTOCOL if "lorsu_rlp" in results["methods"] else ""),
        f"- Ranks and sizes: LoRSU and LoRA r = {plan['r']}, alpha = {plan['lora_alpha']:g}; LoRSU top_k_heads = "
        f"{plan['top_k_heads']}, sparsity = {plan['sparsity']}; `spu` uses the same fc1 sparsity; RLP rank "
        f"{plan['prompt_rank']}, CoOp full rank, both with {len(plan['init_text'].split())} context tokens "
        f"initialised from `{plan['init_text']}`.",
        "",
    ]


JOINT_PROTOCOL = (
    " `lorsu_ce` and `lorsu_rlp` use the class-prompt cross-entropy too; `lorsu_rlp` (LoRSU + RLP as one adapter) "
    "merges LoRSU into the image encoder and folds the prompt into the text position embeddings after every "
    "session, and the next session starts a fresh pair on top (one lr for both parts, from the adapter grid; "
    "`lorsu_rlp_x10` trains the prompt at 10x that lr)."
)
JOINT_ROWS = ("rlp", "lorsu_ce", "lorsu_rlp", "lorsu_rlp_x10")


def joint_section(results: dict) -> list[str]:
    """LoRSU + RLP in one model next to each part alone (all on the class-prompt loss), per setting and lr rule."""
    settings = [s for s in results["continual"] if "lorsu_rlp" in s["methods"]]
    if not settings:
        return []
    lines = [
        "## LoRSU + RLP in one model",
        "",
        "The joint adapter (`LoRSURLPConfig`: LoRSU on the image tower, rank-1 RLP on the text tower, trained "
        "together) against RLP alone and LoRSU alone, all three with the class-prompt cross-entropy, same sessions "
        "and steps. TI / CC in points (mean ± std over seeds), at each method's lr under both rules.",
        "",
    ]
    rows = []
    for setting in settings:
        label = f"{setting['target']}, {setting['shots']}-shot"
        for name in JOINT_ROWS:
            entry = setting["methods"].get(name)
            if entry is None:
                continue
            cells = [label, f"`{name}`", f"{entry['summary']['trainable_params']:,}"]
            for rule in RULES:
                s = _get(setting, name, rule)
                cells.append(f"{pct(s['target_improvement'], signed=True)} / {pct(s['control_change'], signed=True)}")
            rows.append(cells)
    header = ["setting", "method", "trainable params", *[f"TI / CC ({RULES[r]})" for r in RULES]]
    return lines + _table(header, rows) + [""]


def methods_section(results: dict) -> list[str]:
    rows = [[f"`{name}`", m["side"], m["description"]] for name, m in results["methods"].items()]
    return ["## Methods", ""] + _table(["method", "tower", "what is trained each session"], rows) + [""]


def write_markdown(results: dict, path: Path) -> None:
    plan = results["plan"]
    wall = results.get("wall_seconds", 0.0)
    lines = [
        "# Accuracy benchmark: LoRSU vs baselines on a pretrained mini-CLIP",
        "",
        "**What this is.** A CPU-size experiment: the model is the packaged *mini-CLIP* "
        "(`peft_lorsu/assets/mini-clip`, a 7.95M-parameter `transformers.CLIPModel`, width 128, 4 + 4 layers, "
        "8 heads, pretrained from scratch by this project on 28x28 grey Fashion-MNIST and Animal-MNIST images with "
        "template captions; see its model card). It is not OpenAI's CLIP, the images are tiny, and the absolute "
        "numbers say nothing about ViT-L/14 on real photos; what carries over is the comparison between methods "
        "under identical data, steps and evaluation. The same script runs on a real CLIP given a hub name and real "
        "datasets, e.g. `python -m benchmarks.accuracy --model openai/clip-vit-base-patch16 --target <hub dataset> "
        "--control <hub dataset> --r 64` (images are resized to the model's input size).",
        "",
        f"Command: `{results['command']}` ({results['mode']} mode), {results['date']}. "
        f"Wall time {wall / 60:.1f} min{' (resumed: earlier runs were reused)' if results.get('resumed') else ''} "
        f"on {results['machine']['cpus']} shared CPU cores ({results['machine']['torch_threads']} torch thread); "
        f"{results.get('runs', '?')} runs (lr grid, final seeds, investigation) taking "
        f"{results.get('run_seconds_total', 0) / 60:.1f} min together; model: {results['model']}.",
        "",
    ]
    lines += targets_section(results)
    lines += [
        "## Continual few-shot results",
        "",
        f"Target and control accuracy (%) after the last of {plan['sessions']} sessions, TI and CC in points, "
        "training seconds per run (probe + training, without evaluation). Plots: "
        f"[per session]({SESSIONS_PNG}), [TI vs CC]({SCATTER_PNG}).",
        "",
        f"![accuracy per session]({SESSIONS_PNG})",
        "",
        f"![TI vs CC]({SCATTER_PNG})",
        "",
    ]
    for setting in results["continual"]:
        lines += continual_section(setting, results)
    lines += joint_section(results)
    if results["base_to_new"]:
        lines += b2n_section(results) + [f"![base-to-new]({B2N_PNG})", ""]
    lines += protocol_section(results)
    lines += methods_section(results)
    lines += lr_section(results)
    lines += investigation_section(results)
    lines += b2n_investigation_section(results)
    if NOTES.exists() and results["mode"] != "smoke":
        lines += [NOTES.read_text().strip(), ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sessions(results: dict, path: Path) -> None:
    """Rows: settings; columns: target and controls; one line per method (mean, band = ± std)."""
    plt = _pyplot()
    settings = results["continual"]
    n_cols = max(len(s["columns"]) for s in settings)
    fig, axes = plt.subplots(len(settings), n_cols, figsize=(4.2 * n_cols, 3.1 * len(settings)), squeeze=False)
    colors = _colors(results)
    for i, setting in enumerate(settings):
        for j, column in enumerate(setting["columns"]):
            ax = axes[i][j]
            for name, entry in setting["methods"].items():
                rows = entry["summary"]["rows"]
                mean = [100 * r[j][0] for r in rows]
                std = [100 * r[j][1] for r in rows]
                x = list(range(len(rows)))
                style = "--" if name == "zero_shot" else "-"
                ax.plot(x, mean, style, marker="o", ms=3, color=colors[name], label=name)
                ax.fill_between(
                    x,
                    [m - s for m, s in zip(mean, std)],
                    [m + s for m, s in zip(mean, std)],
                    color=colors[name],
                    alpha=0.12,
                )
            role = "target" if j == 0 else "control"
            name = setting["target"] if j == 0 else column
            ax.set_title(f"{setting['target']} {setting['shots']}-shot: {role} {name}", fontsize=9)
            ax.set_xlabel("session (0 = zero-shot)", fontsize=8)
            ax.set_ylabel("accuracy (%)", fontsize=8)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = min(len(labels), 7)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    legend_rows = -(-len(labels) // ncol)
    _save(fig, path, rect=(0, (0.02 + 0.018 * legend_rows) * 4 / max(len(settings), 1), 1, 1))


def plot_ti_cc(results: dict, path: Path) -> None:
    """TI against CC per setting; marker area proportional to the square root of the trainable parameters."""
    plt = _pyplot()
    settings = results["continual"]
    n_cols = min(2, len(settings))
    n_rows = math.ceil(len(settings) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(6 * n_cols, 4.6 * n_rows), squeeze=False)
    colors = _colors(results)
    largest = max(e["summary"]["trainable_params"] for s in settings for e in s["methods"].values()) or 1
    for ax in axes.flat[len(settings) :]:
        ax.axis("off")
    for ax, setting in zip(axes.flat, settings):
        for name, entry in setting["methods"].items():
            s = entry["summary"]
            if name == "zero_shot":
                continue
            ti, cc = s["target_improvement"], s["control_change"]
            size = 20 + 600 * math.sqrt(s["trainable_params"] / largest)
            ax.errorbar(
                100 * ti[0],
                100 * cc[0],
                xerr=100 * ti[1],
                yerr=100 * cc[1],
                fmt="none",
                ecolor=colors[name],
                alpha=0.5,
            )
            ax.scatter(
                100 * ti[0],
                100 * cc[0],
                s=size,
                color=colors[name],
                alpha=0.7,
                edgecolors="k",
                label=f"{name} ({_short(s['trainable_params'])})",
            )
            if "balanced" in entry and entry["balanced"]["lr"] != entry["lr"]:  # hollow: the balanced lr rule
                bal = entry["balanced"]["summary"]
                x, y = 100 * bal["target_improvement"][0], 100 * bal["control_change"][0]
                ax.scatter(x, y, s=size, facecolors="none", edgecolors=colors[name], linewidths=1.5)
                ax.plot([100 * ti[0], x], [100 * cc[0], y], ":", color=colors[name], lw=1)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(f"{setting['target']} {setting['shots']}-shot", fontsize=9)
        ax.set_xlabel("target improvement TI (pts)", fontsize=8)
        ax.set_ylabel("control change CC (pts)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best", markerscale=0.4)
    fig.suptitle(
        "TI vs CC (up-right is better); marker area ~ sqrt(trainable parameters); filled: headline lr rule, "
        "hollow: balanced lr rule (where it picks another lr)",
        fontsize=9,
    )
    _save(fig, path)


def plot_b2n(results: dict, path: Path) -> None:
    plt = _pyplot()
    settings = results["base_to_new"]
    fig, axes = plt.subplots(1, len(settings), figsize=(4.6 * len(settings), 3.4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        names = list(setting["methods"])
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            s = setting["methods"][name]["summary"]
            values = [s[m] for m in ("base", "new", "harmonic")]
            x = [i + (k - (len(names) - 1) / 2) * width for i in range(3)]
            ax.bar(
                x,
                [100 * v[0] for v in values],
                width,
                yerr=[100 * v[1] for v in values],
                capsize=2,
                label=f"{name} ({_short(s['trainable_params'])})",
            )
        ax.set_xticks(range(3), ["base B", "new N", "H"])
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.set_title(f"base-to-new: {setting['dataset']}\ncontext '{setting.get('init_text', '')}'", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_tradeoff(results: dict, path: Path) -> None:
    """Validation TI against validation CC, one line per method through its lr grid (labels: the lr)."""
    plt = _pyplot()
    studies = results["investigation"]
    fig, axes = plt.subplots(1, len(studies), figsize=(6.2 * len(studies), 5), squeeze=False)
    main, extra = _colors(results), plt.get_cmap("tab20b")
    for ax, study in zip(axes[0], studies):
        for k, (name, entry) in enumerate(study["methods"].items()):
            xs = [100 * pt["ti_val"][0] for pt in entry["points"]]
            ys = [100 * pt["cc_val"][0] for pt in entry["points"]]
            if name in main:  # the benchmark's own rows: solid, in their usual colours
                ax.plot(xs, ys, "-", marker="o", ms=5, lw=2, color=main[name], label=name)
            else:
                ax.plot(xs, ys, "--", marker=".", ms=4, lw=1, color=extra((3 * k) % 20), label=name)
            for x, y, pt in zip(xs, ys, entry["points"]):
                ax.annotate(f"{pt['lr']:g}", (x, y), fontsize=5, alpha=0.7)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{study['target']} {study['shots']}-shot (validation)", fontsize=9)
        ax.set_xlabel("TI on target validation (pts)", fontsize=8)
        ax.set_ylabel("CC on control validation (pts)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
    _save(fig, path)


def _save(fig: Any, path: Path, rect: tuple[float, float, float, float] | None = None) -> None:
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _short(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _colors(results: dict) -> dict[str, Any]:
    plt = _pyplot()
    names = list(results["methods"])
    # tab20's dark shades first (tab10's colours), then its light ones: no two of up to 20 methods share a colour
    cmap = plt.get_cmap("tab20")
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {name: ("black" if name == "zero_shot" else cmap(order[i % 20])) for i, name in enumerate(names)}


def write_report(results: dict, out: Path) -> list[Path]:
    """Write ``accuracy.md`` and the PNGs into ``out``; returns their paths."""
    paths = [out / "accuracy.md"]
    write_markdown(results, paths[0])
    if results["continual"]:
        plot_sessions(results, out / SESSIONS_PNG)
        plot_ti_cc(results, out / SCATTER_PNG)
        paths += [out / SESSIONS_PNG, out / SCATTER_PNG]
    if results["base_to_new"]:
        plot_b2n(results, out / B2N_PNG)
        paths.append(out / B2N_PNG)
    if results.get("investigation"):
        plot_tradeoff(results, out / TRADEOFF_PNG)
        paths.append(out / TRADEOFF_PNG)
    return paths
