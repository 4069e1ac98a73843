"""Supervised training of a teacher or a baseline student (no distillation):

    accelerate launch scripts/train.py --student resnet50 --train_data coco/train.json --eval_data coco/val.json \
        --output_dir teacher --max_steps 90000 --per_device_train_batch_size 8 --bf16
"""

from hf_sad.cli import train_main

if __name__ == "__main__":
    train_main()
