"""Distil a frozen teacher into a student with SAD. Runs unchanged on 1..N GPUs or machines:

    accelerate launch scripts/distill.py --teacher path/to/teacher --student resnet18 \
        --train_data coco/train.json --eval_data coco/val.json --unlabeled_data path/to/images \
        --output_dir sad-student --max_steps 90000 --per_device_train_batch_size 8 --bf16

Every `SADTrainingArguments` / `TrainingArguments` flag works (`--help` lists them).
"""

from hf_sad.cli import distill_main

if __name__ == "__main__":
    distill_main()
