"""lr="auto": the shared selection rule, the validation split, per-method defaults, the runner and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import clip_tokenizer, tiny_clip
from test_continual import classification_set, runner_for

from peft_lorsu.app.continual import ContinualConfig, ContinualRunner, method_defaults
from peft_lorsu.app.lr_search import LRSelection, default_grid, select_lr, split_validation


def fake_run(target: float, ti: float, cc: float) -> dict:
    return {"rows": [[0.1, 0.9], [target, 0.9 + cc]], "target_improvement": ti, "control_change": cc}


def test_rule_picks_the_best_validation_target_and_breaks_ties_towards_the_smaller_lr():
    scores = {1e-3: (0.5, 0.45, -0.01), 3e-3: (0.7, 0.6, -0.2), 1e-2: (0.7, 0.6, -0.3)}
    calls = []

    def evaluate(lr, seed):
        calls.append((lr, seed))
        return fake_run(*scores[lr])

    selection = select_lr([1e-2, 1e-3, 3e-3], evaluate, seeds=[0, 1], balanced=True)
    assert selection.chosen == 3e-3  # 3e-3 and 1e-2 tie at 0.7: the smaller wins
    assert selection.chosen_balanced == 1e-3  # TI + CC: 0.44 vs 0.4 vs 0.3
    assert sorted(calls) == sorted((lr, s) for lr in scores for s in (0, 1))
    assert selection.grid[1] == [1e-3, 0.5, 0.45, -0.01]
    table = selection.table().splitlines()
    assert table[3].startswith("     0.003") and table[3].endswith("<- chosen")
    assert LRSelection.from_dict(json.loads(json.dumps(selection.to_dict()))) == selection


def test_rule_averages_over_seeds():
    selection = select_lr([1e-3, 1e-2], lambda lr, s: fake_run(0.5 + (s if lr == 1e-3 else 0.2), 0, 0), [0, 1])
    assert selection.grid[0][1] == pytest.approx(1.0) and selection.chosen == 1e-3
    with pytest.raises(ValueError, match="lr grid must be a non-empty list of numbers > 0"):
        select_lr([1e-3, 0.0], lambda lr, s: fake_run(0, 0, 0))


def test_validation_split_partitions_each_class():
    data = classification_set(6, 0)
    rest, val = split_validation(data, 2, seed=0)
    assert torch.bincount(val.labels).tolist() == [2, 2, 2, 2] and torch.bincount(rest.labels).tolist() == [4] * 4
    rows = {tuple(x.flatten()[:5].tolist()) for x in torch.cat([rest.pixel_values, val.pixel_values])}
    assert len(rows) == 24  # nothing duplicated, nothing lost
    again = split_validation(data, 2, seed=0)[1]
    assert torch.equal(again.pixel_values, val.pixel_values)
    with pytest.raises(ValueError, match=r"leaves none to train on for \['zero', 'one', 'two', 'three'\]"):
        split_validation(data, 6)


def test_each_method_gets_its_own_recipe_unless_given():
    assert method_defaults("rlp") == {"optimizer": "sgd", "lr": 2e-3, "lr_schedule": "cosine"}
    for method in ("lorsu", "lora", "full", "spu", "lorsu_rlp"):
        config = ContinualConfig(method=method)
        assert (config.optimizer, config.lr, config.lr_schedule) == ("adamw", 1e-5, "constant")
    coop = ContinualConfig(method="coop")
    assert (coop.optimizer, coop.lr, coop.lr_schedule) == ("sgd", 2e-3, "cosine")
    mine = ContinualConfig(method="rlp", optimizer="adamw", lr=0.03, lr_schedule="epoch_cosine")
    assert (mine.optimizer, mine.lr, mine.lr_schedule) == ("adamw", 0.03, "epoch_cosine")
    assert default_grid("full", "adamw") == [3e-5, 1e-4, 3e-4]
    assert default_grid("rlp", "sgd") == [2e-3, 2e-2, 2e-1] and default_grid("lorsu", "adamw") == [1e-3, 3e-3, 1e-2]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"optimizer": "adam"}, r"optimizer must be one of \('adamw', 'sgd'\) or None, got 'adam'"),
        ({"lr_schedule": "linear"}, r"lr_schedule must be one of \('constant', 'cosine', 'epoch_cosine'\)"),
        ({"lr": "fast"}, r"lr must be a finite number > 0, 'auto' or None, got 'fast'"),
        ({"lr": float("nan")}, r"lr must be a finite number > 0, 'auto' or None, got nan"),
        ({"lr_grid": [1e-3, -1.0]}, r"lr_grid must be None or a list of numbers > 0, got \[0.001, -1.0\]"),
        ({"lr_grid": []}, r"lr_grid must be None or a list of numbers > 0, got \[\]"),
        ({"lr_val_per_class": 0}, r"lr_val_per_class must be an integer >= 1, got 0"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        ContinualConfig(**fields)


def auto_runner(method: str, grid=(1e-4, 1e-1)) -> ContinualRunner:
    config = ContinualConfig(
        method=method, sessions=2, shots=2, epochs=2, batch_size=4, r=4, lora_alpha=4, lr="auto",
        lr_grid=list(grid), lr_val_per_class=2, loss="class_ce",
    )  # fmt: skip
    return runner_for(config)


def test_runner_chooses_on_validation_then_trains_at_the_choice(tmp_path, monkeypatch):
    run = auto_runner("lora")
    result = run.run(show_progress=False, checkpoint_dir=tmp_path)
    selection = LRSelection.from_dict(result.lr_selection)
    assert [row[0] for row in selection.grid] == [1e-4, 1e-1]
    best = max(sorted(selection.grid), key=lambda row: row[1])
    assert selection.chosen == best[0] and result.config["lr"] == selection.chosen
    # the search scored each lr by its final target accuracy on the 8 set-aside images: multiples of 1/8
    assert all(abs(row[1] * 8 - round(row[1] * 8)) < 1e-6 for row in selection.grid)
    # the final run is the same as a run given the chosen lr on the training images minus the validation ones
    rest, _ = split_validation(classification_set(6, 0), 2, seed=0)
    again = ContinualRunner(
        tiny_clip(real_vocab=True), clip_tokenizer(), rest, classification_set(3, 1),
        {"control": classification_set(3, 2, names=["cat", "dog"])},
        ContinualConfig(**{**result.config, "lr": selection.chosen}),
    ).run(show_progress=False)  # fmt: skip
    assert again.rows == result.rows
    saved = json.loads((tmp_path / "lr_selection.json").read_text())
    assert saved["selection"]["chosen"] == selection.chosen and saved["config"]["lr"] == "auto"

    # the same run again resumes from the checkpoint: no second search
    monkeypatch.setattr(ContinualRunner, "choose_lr", lambda *a, **k: pytest.fail("searched again"))
    resumed = auto_runner("lora").run(show_progress=False, checkpoint_dir=tmp_path)
    assert resumed.rows == result.rows and resumed.lr_selection == result.lr_selection


def test_zero_shot_needs_no_search():
    result = auto_runner("zero_shot").run(show_progress=False)
    assert result.lr_selection is None and len(result.rows) == 1


def linear_fit(**kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4 -> 1 linear model after ``fit`` on 3 fixed batches per epoch; returns (weight before, weight after)."""
    from peft_lorsu.app.training import fit

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, 1, generator=g)} for _ in range(3)]
    before = model.weight.detach().clone()
    fit(model, batches, loss_fn=lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean(), show_progress=False, **kwargs)
    return before, model.weight.detach()


def test_fit_uses_the_named_optimizer_and_schedule():
    before, after = linear_fit(epochs=2, lr=0.05, optimizer="sgd", schedule="cosine")
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(3)]
    for step in range(6):
        x, y = batches[step % 3]
        for group in opt.param_groups:
            group["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * step / 6))
        opt.zero_grad()
        ((reference(x) - y) ** 2).mean().backward()
        opt.step()
    assert torch.allclose(after, reference.weight.detach(), atol=1e-7)
    # epoch_cosine: the first epoch runs at 1e-6, so Adam's 3 steps move each weight by at most ~3e-6
    before, after = linear_fit(epochs=1, lr=0.1, schedule="epoch_cosine")
    assert 0 < (after - before).abs().max() <= 3.1e-6
    before, after = linear_fit(epochs=1, lr=0.1, schedule="constant")
    assert (after - before).abs().max() > 0.1
    with pytest.raises(ValueError, match=r"optimizer must be one of \('adamw', 'sgd'\), got 'rmsprop'"):
        linear_fit(optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"schedule must be one of .*got 'linear'"):
        linear_fit(schedule="linear")
