"""Arguments of detection training and SAD distillation (`hf_sad.arguments`): defaults and validation.

The defaults detection needs (unused columns kept, per-image label lists not concatenated, every process reading its
own data) and those of the robustness settings; every impossible value is refused naming the argument, by
`SADTrainingArguments` and by `hf_sad.cli.main([...])` (argparse choices for enumerated ones), before anything is
trained.
"""

from __future__ import annotations

import pytest

from hf_sad.arguments import SADTrainingArguments
from hf_sad.cli import main
from hf_sad.data.synthetic import synthetic_id2label

from .utils import TINY_CLI, assert_nothing_trained, make_args


def test_arguments_validate_and_set_detection_defaults(tmp_path):
    args = make_args(tmp_path)
    assert args.remove_unused_columns is False and args.eval_do_concat_batches is False
    assert args.ddp_find_unused_parameters is False
    assert args.accelerator_config.dispatch_batches is False
    for field, value in [("distill_loss", "mse"), ("unlabeled_ratio", 1.0), ("distill_temperature", 0.0),
                         ("adl_variant", "x"), ("pseudo_label_threshold", 1.5), ("teacher_dtype", "int8"),
                         ("pseudo_box_weight", -1.0)]:
        with pytest.raises(ValueError, match=field):
            make_args(tmp_path, **{field: value})


ENUMERATED = {"distill_loss", "adl_variant", "distill_normalizer", "teacher_dtype"}
#: (argument, its CLI values, the same as a Python value)
IMPOSSIBLE_ARGUMENTS = [
    ("unlabeled_ratio", ["1.5"], 1.5), ("unlabeled_ratio", ["-0.1"], -0.1), ("distill_loss", ["mse"], "mse"),
    ("adl_variant", ["other"], "other"), ("distill_normalizer", ["mean"], "mean"), ("teacher_dtype", ["int8"], "int8"),
    ("adl_beta", ["-1"], -1.0), ("adl_gamma", ["-2"], -2.0), ("labeled_distill_weight", ["-1"], -1.0),
    ("distill_temperature", ["0"], 0.0), ("normalizer_power", ["-1"], -1.0), ("pseudo_label_threshold", ["1.0"], 1.0),
    ("hflip_prob", ["1.5"], 1.5), ("scale_jitter", ["1.2", "0.8"], [1.2, 0.8]),
    ("scale_jitter", ["0", "1"], [0.0, 1.0]), ("scale_jitter", ["1.0"], [1.0]),
    ("max_skipped_image_fraction", ["2"], 2.0), ("max_skipped_image_fraction", ["-0.5"], -0.5),
    ("min_images_before_skip_check", ["-1"], -1), ("max_consecutive_nonfinite_steps", ["0"], 0),
]


@pytest.mark.parametrize(("name", "cli_values", "value"), IMPOSSIBLE_ARGUMENTS,
                         ids=[f"{n}={'_'.join(v)}" for n, v, _ in IMPOSSIBLE_ARGUMENTS])
def test_impossible_argument_values_are_refused_naming_the_argument(tmp_path, capsys, name, cli_values, value):
    expected = rf"SADTrainingArguments\.{name}=.* is invalid: expected"
    with pytest.raises(ValueError, match=expected):
        SADTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, **{name: value})
    command = ["distill", "--teacher", str(tmp_path / "teacher"), "--output_dir", str(tmp_path / "cli"), *TINY_CLI,
               f"--{name}", *cli_values]
    if name in ENUMERATED:  # argparse knows the choices: a usage error naming the flag and the choices
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"--{name}" in error and f"invalid choice: '{cli_values[0]}'" in error, error
    else:
        with pytest.raises(ValueError, match=expected):
            main(command)
    assert_nothing_trained(tmp_path / "cli")


def test_defaults_of_the_robustness_arguments():
    args = SADTrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    assert args.max_skipped_image_fraction == 0.01 and args.min_images_before_skip_check == 1000
    assert args.skip_bad_labeled_images is False and args.max_consecutive_nonfinite_steps == 10
    assert synthetic_id2label()  # the CLI's default classes exist
