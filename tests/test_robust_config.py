"""Bad configuration fails before the first training step, with a message that says what to change.

Each case goes through `SADTrainer` and, where the CLI can express it, through `hf_sad.cli.main([...])`: a teacher
whose classes (names or order), pyramid levels or anchors differ from the student's; a missing or unloadable teacher;
datasets without the expected columns; impossible argument values. After a CLI failure the output folder holds no
weights and no checkpoint (nothing was trained).
"""

from __future__ import annotations

import datasets
import pytest
from torch import nn

from hf_sad.cli import main
from hf_sad.synthetic import SYNTHETIC_LABELS, make_labeled_dataset, synthetic_id2label
from hf_sad.trainer import SADTrainer, SADTrainingArguments

from .robust_utils import make_args, tiny_detector

TINY_CLI = ["--student", "resnet18", "--train_data", "synthetic:4", "--synthetic_image_size", "64", "--image_size",
            "64", "--fpn_channels", "8", "--head_channels", "8", "--head_num_convs", "1", "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
            "--disable_tqdm", "true"]

REVERSED = dict(enumerate(reversed(SYNTHETIC_LABELS)))
RENAMED = {i: f"class{i}" for i in range(len(SYNTHETIC_LABELS))}
FEWER = dict(enumerate(SYNTHETIC_LABELS[:3]))
#: name -> (teacher overrides, what the error must mention)
INCOMPATIBLE_TEACHERS = {
    "class_names": ({"id2label": RENAMED}, "classes (by id)"),
    "class_order": ({"id2label": REVERSED}, "classes (by id)"),
    "class_count": ({"id2label": FEWER}, "classes (by id)"),
    "max_level": ({"max_level": 6}, "max_level: teacher 6 vs student 7"),
    "min_level": ({"min_level": 4}, "min_level: teacher 4 vs student 3"),
    "aspect_ratios": ({"aspect_ratios": [1.0]}, "aspect_ratios: teacher [1.0]"),
    "scales_per_octave": ({"scales_per_octave": 2}, "scales_per_octave: teacher 2 vs student 3"),
    "anchor_scale": ({"anchor_scale": 3.0}, "anchor_scale: teacher 3.0 vs student 4.0"),
}


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    return make_labeled_dataset(4, seed=0, image_size=64, cache_dir=str(tmp_path_factory.mktemp("cache")))


def assert_nothing_trained(output_dir):
    found = sorted(p.name for p in output_dir.glob("*")) if output_dir.exists() else []
    assert not [name for name in found if name.startswith("checkpoint") or name.endswith(".safetensors")], found


@pytest.mark.parametrize("case", sorted(INCOMPATIBLE_TEACHERS))
def test_incompatible_teacher_is_refused_by_trainer_and_cli(tmp_path, labeled, case):
    overrides, expected = INCOMPATIBLE_TEACHERS[case]
    student, processor = tiny_detector()
    teacher, teacher_processor = tiny_detector(seed=1, **overrides)
    args = make_args(tmp_path, distill_loss="adl")
    with pytest.raises(ValueError) as error:
        SADTrainer(student, teacher, args, labeled, processing_class=processor)
    assert expected in str(error.value) and "Build the student with the teacher's" in str(error.value)

    teacher.save_pretrained(tmp_path / "teacher")
    teacher_processor.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="not compatible for distillation") as error:
        main(["distill", "--teacher", str(tmp_path / "teacher"), "--output_dir", str(tmp_path / "cli"), *TINY_CLI])
    assert expected in str(error.value)
    assert_nothing_trained(tmp_path / "cli")


@pytest.mark.parametrize("where", ["missing", "empty_folder", "a_file"])
def test_missing_or_unloadable_teacher_is_refused_by_trainer_and_cli(tmp_path, labeled, where):
    teacher = tmp_path / where
    if where == "empty_folder":
        teacher.mkdir()
    elif where == "a_file":
        teacher.write_text("not a model")
    student, processor = tiny_detector()
    with pytest.raises(ValueError, match=f"Could not load the teacher from '{teacher}'"):
        SADTrainer(student, str(teacher), make_args(tmp_path, distill_loss="adl"), labeled, processing_class=processor)
    with pytest.raises(ValueError, match="Could not load the teacher"):
        main(["distill", "--teacher", str(teacher), "--output_dir", str(tmp_path / "cli"), *TINY_CLI])
    assert_nothing_trained(tmp_path / "cli")


def test_teacher_of_the_wrong_kind_or_none_is_refused(tmp_path, labeled):
    student, processor = tiny_detector()
    with pytest.raises(TypeError, match="teacher must be a SADForObjectDetection, got Linear"):
        SADTrainer(student, nn.Linear(2, 2), make_args(tmp_path, distill_loss="adl"), labeled,
                   processing_class=processor)
    with pytest.raises(ValueError, match="needs a teacher_model.*distill_loss='none'"):
        SADTrainer(student, None, make_args(tmp_path, distill_loss="kl"), labeled, processing_class=processor)
    with pytest.raises(SystemExit):
        main(["distill", "--output_dir", str(tmp_path / "cli"), *TINY_CLI])


def test_datasets_without_the_expected_columns_are_refused_listing_schema_and_columns(tmp_path, labeled):
    student, processor = tiny_detector()
    args = make_args(tmp_path)
    no_objects = labeled.remove_columns("objects")
    with pytest.raises(ValueError) as error:
        SADTrainer(student, None, args, no_objects, processing_class=processor)
    message = str(error.value)
    assert "['height', 'image', 'image_id', 'width']" in message and "`objects` with `bbox`" in message

    wrong_fields = datasets.Dataset.from_dict(
        {"image": [labeled[0]["image"]], "objects": [{"boxes": [[1.0, 1.0, 4.0, 4.0]], "labels": [0]}]})
    with pytest.raises(ValueError, match=r"`objects` with fields \['boxes', 'labels'\].*`bbox`"):
        SADTrainer(student, None, args, wrong_fields, processing_class=processor)

    no_image = labeled.remove_columns("image")
    with pytest.raises(ValueError, match=r"No image column found; the dataset has columns \['height', 'image_id'"):
        SADTrainer(student, None, args, no_image, processing_class=processor)

    captions = datasets.Dataset.from_dict({"text": ["a", "b"]})
    with pytest.raises(ValueError, match=r"No image column found; the dataset has columns \['text'\]"):
        SADTrainer(student, None, args, labeled, captions, processing_class=processor)

    streaming = labeled.to_iterable_dataset()
    with pytest.raises(ValueError, match="streaming train_dataset has no length: set max_steps"):
        SADTrainer(student, None, make_args(tmp_path, max_steps=-1), streaming, processing_class=processor)

    renamed = labeled.cast_column("objects", datasets.Features({
        "id": datasets.List(datasets.Value("int64")), "area": datasets.List(datasets.Value("float32")),
        "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
        "category": datasets.List(datasets.ClassLabel(names=[f"x{i}" for i in range(len(SYNTHETIC_LABELS))]))}))
    with pytest.raises(ValueError, match=r"categories \['x0', .*not among the model's labels"):
        SADTrainer(student, None, args, renamed, processing_class=processor)
    with pytest.raises(ValueError, match="eval_dataset classes"):
        SADTrainer(student, None, args, labeled, eval_dataset=renamed, processing_class=processor)


def test_cli_refuses_datasets_without_the_expected_columns(tmp_path, labeled):
    labeled.remove_columns("objects").save_to_disk(str(tmp_path / "no_objects"))
    cli = [arg for arg in TINY_CLI if arg != "synthetic:4"]
    cli[cli.index("--train_data") + 1:cli.index("--train_data") + 1] = [str(tmp_path / "no_objects")]
    with pytest.raises(ValueError, match=r"train_dataset has columns \['height', 'image', 'image_id', 'width'\]"):
        main(["train", "--output_dir", str(tmp_path / "cli"), *cli])
    assert_nothing_trained(tmp_path / "cli")

    (tmp_path / "pool").mkdir()
    datasets.Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(tmp_path / "pool" / "part-0.parquet"))
    student, processor = tiny_detector(seed=1)
    student.save_pretrained(tmp_path / "teacher")
    processor.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"No image column found; the dataset has columns \['text'\]"):
        main(["distill", "--teacher", str(tmp_path / "teacher"), "--unlabeled_data", str(tmp_path / "pool"),
              "--output_dir", str(tmp_path / "cli"), *TINY_CLI])
    assert_nothing_trained(tmp_path / "cli")


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
