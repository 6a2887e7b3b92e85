"""compare --pair: any two arms, paired on dataset, architecture, seed and fold, checked
against differences computed here from the runs as they were logged."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow import MlflowClient

from mlexp.analysis import stats
from mlexp.analysis.compare import compare, format_table
from mlexp.analysis.tables import p_text
from mlexp.commands.cli import main
from mlexp.errors import MlexpError
from tests.commands.test_user_errors import assert_one_line_error, run_cli
from tests.run_factory import log_run

LINEAR_PRETRAINED = {1: 0.72, 2: 0.75, 3: 0.71, 4: 0.78, 5: 0.74, 6: 0.80}  # seed -> best val acc (seed 6: unpaired)
FULL_SCRATCH = {1: 0.65, 2: 0.70, 3: 0.69, 4: 0.66, 5: 0.73}
PAIR = "init=pretrained,strategy=linear vs init=scratch,strategy=full"


def populate_arms(client: MlflowClient, experiment: str) -> None:
    """Linear probes of pretrained resnet18 (2 epochs) and full scratch trainings (3 epochs) for
    seeds 1-5, a linear probe with no partner (seed 6), runs of the other two arms (pretrained
    full, scratch linear) that the pair must not take, and seed 1's fold 1 on both arms trained
    on the same split as its fold 0 (one mlexp.split_digest): counted once, not as another pair."""
    for seed, best in LINEAR_PRETRAINED.items():
        log_run(client, experiment, strategy="linear", seed=seed, val_acc=[0.5, best], start_time=1000 + seed,
                tags={"mlexp.split_digest": "seed1"} if seed == 1 else None)
    for seed, best in FULL_SCRATCH.items():
        log_run(client, experiment, init="scratch", seed=seed, val_acc=[0.3, 0.5, best], start_time=1000 + seed,
                tags={"mlexp.split_digest": "seed1"} if seed == 1 else None)
    for seed in range(1, 6):
        log_run(client, experiment, seed=seed, val_acc=[0.6, 0.9], start_time=2000 + seed)
    for seed in range(1, 4):
        log_run(client, experiment, init="scratch", strategy="linear", seed=seed, val_acc=[0.2, 0.3],
                start_time=2000 + seed)
    log_run(client, experiment, strategy="linear", seed=1, fold=1, val_acc=[0.5, 0.99], start_time=3000,
            tags={"mlexp.split_digest": "seed1"})
    log_run(client, experiment, init="scratch", seed=1, fold=1, val_acc=[0.05, 0.08, 0.1], start_time=3000,
            tags={"mlexp.split_digest": "seed1"})


def test_a_pair_of_arms_is_one_row_of_the_report(sqlite_uri, tmp_path, capsys):
    client = MlflowClient(sqlite_uri)
    populate_arms(client, "arms")
    out = tmp_path / "out"
    # the CLI's two-word spelling: --pair A B (one string, 'A vs B', is the same pair)
    main(["compare", "--experiment", "arms", "--pair", "init=pretrained,strategy=linear", "init=scratch,strategy=full",
          "--out", str(out), "--log-run", "false"])

    differences = [LINEAR_PRETRAINED[seed] - FULL_SCRATCH[seed] for seed in FULL_SCRATCH]  # seeds 1-5, fold 0
    table = pd.read_csv(out / "comparisons.csv")
    [row] = table[table["kind"] == "pair"].to_dict("records")
    assert (row["a"], row["b"], row["backbone"]) == ("init=pretrained,strategy=linear", "init=scratch,strategy=full",
                                                    "resnet18")
    assert row["n"] == len(differences) == 5  # not seed 6 (no partner), not seed 1's second "fold"
    assert row["mean_diff"] == pytest.approx(sum(differences) / len(differences))
    assert row["a_mean"] == pytest.approx(sum(LINEAR_PRETRAINED[s] for s in FULL_SCRATCH) / 5)
    expected = stats.paired([LINEAR_PRETRAINED[s] for s in FULL_SCRATCH], list(FULL_SCRATCH.values()))
    assert (row["ci_low"], row["ci_high"], row["p_value"]) == (
        pytest.approx(expected.ci_low), pytest.approx(expected.ci_high), pytest.approx(expected.p_value))
    # Holm over every row of the report, the pair's among them
    assert table["p_value"].notna().sum() > 1
    assert row["p_holm"] == pytest.approx(stats.holm(table["p_value"].to_numpy(dtype=float))[
        table.index[table["kind"] == "pair"][0]])
    assert "unequal budget: init=pretrained,strategy=linear trained 2 epochs against init=scratch,strategy=full's 3" \
        in row["note"]
    printed = capsys.readouterr().out
    assert "Pairs asked for (--pair): arm A minus arm B, best/val_acc" in printed

    report = (out / "report.md").read_text()
    sentence = (f"- Frozen pretrained (linear probe) vs scratch (full training) on resnet18: "
                f"{100 * row['mean_diff']:+.1f} pp, 95% CI [{100 * row['ci_low']:+.1f} pp, "
                f"{100 * row['ci_high']:+.1f} pp], n = 5 pairs, p (Holm) = {p_text(row['p_holm'])}")
    assert sentence in report, report
    assert report.index("## The pairs asked for (--pair)") < report.index("## 1.")

    # One string, 'A vs B', through the library: the same row
    again = compare(client, ["arms"], out_dir=tmp_path / "again", plots=False, arm_pairs=[PAIR])
    [same] = again.comparisons[again.comparisons["kind"] == "pair"].to_dict("records")
    assert (same["n"], same["mean_diff"]) == (5, pytest.approx(row["mean_diff"]))


def test_arms_that_match_nothing_or_overlap_are_said_not_crashed(sqlite_uri, tmp_path):
    client = MlflowClient(sqlite_uri)
    populate_arms(client, "arms")
    for seed in (1, 2):
        log_run(client, "arms", backbone="deit_small", strategy="linear", seed=seed, val_acc=[0.4, 0.5])
        log_run(client, "arms", backbone="deit_small", seed=seed, val_acc=[0.4, 0.6])
    result = compare(client, ["arms"], out_dir=tmp_path / "out", plots=False,
                     arm_pairs=["init=nothing vs init=scratch; init=pretrained vs strategy=full",
                                "strategy=linear strategy=full", "backbone=deit_small,lr=1e-3 vs backbone=resnet18"])
    rows = result.comparisons[result.comparisons["kind"] == "pair"]
    nothing = rows[rows["a"] == "init=nothing"].iloc[0]
    assert nothing["n"] == 0 and "no run matches init=nothing" in nothing["note"]
    overlap = rows[rows["b"] == "strategy=full"].iloc[0]
    assert "7 run(s) match both arms: left out" in overlap["note"]  # pretrained full: 5 resnet18, 2 deit_small
    strategies = rows[(rows["a"] == "strategy=linear") & (rows["b"] == "strategy=full")]
    assert strategies["backbone"].tolist() == ["all backbones", "deit_small", "resnet18"]
    assert strategies["n"].tolist() == [7, 2, 5]  # resnet18: seeds 1-5 fold 0; deit_small: seeds 1-2
    archs = rows[rows["a"] == "backbone=deit_small,lr=1e-3"].iloc[0]  # an arm naming the arch: not matched on it
    assert (archs["backbone"], archs["n"]) == ("-", 2)  # deit_small's seeds 1-2 against resnet18's (its arms averaged)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Nothing vs scratch: no run matches init=nothing; no matched pairs" in report
    assert "no run matches init=nothing" in format_table(result)

    empty = compare(client, ["arms"], "tags.`mlexp.backbone` = 'none'", out_dir=tmp_path / "empty", plots=False,
                    arm_pairs=[PAIR])
    assert empty.comparisons["n"].tolist() == [0] and "no run matches" in empty.comparisons["note"][0]


@pytest.mark.parametrize("pair, message", [
    ("init", "expected two arms"),
    ("=x vs init=scratch", "'=x' is not KEY=VALUE"),
    ("init=pretrained vs init=", "'init=' is not KEY=VALUE"),
    ("init=pretrained", "expected two arms"),
    ("init=scratch vs init=scratch", "both arms are init=scratch"),
    ("init=scratch,init=pretrained vs strategy=full", "'init' is set twice"),
    ("colour=red vs init=scratch", "'colour' is neither a tag nor a param"),
])
def test_a_malformed_pair_is_one_line(pair, message, sqlite_uri, tmp_path, capsys):
    client = MlflowClient(sqlite_uri)
    log_run(client, "arms", val_acc=[0.5, 0.6])
    with pytest.raises(MlexpError, match=message) as error:
        compare(client, ["arms"], out_dir=tmp_path / "out", plots=False, arm_pairs=[pair])
    assert "\n" not in str(error.value)
    capsys.readouterr()  # what creating the store logged
    code, err = run_cli(["compare", "--experiment", "arms", "--pair", pair, "--out", str(tmp_path / "cli"),
                         "--log-run", "false"], capsys)
    assert_one_line_error(code, err, "--pair")
