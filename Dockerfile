# deberta_ds on an NVIDIA PyTorch (NGC) image: CUDA, PyTorch, Triton and apex (fused LayerNorm,
# FusedLAMB) come with the base image; deepspeed, sentencepiece and tensorboard are installed at
# the versions pinned in requirements.txt (the same file setup.py reads), with DeepSpeed's CPUAdam
# (ZeRO-Offload) and utils ops compiled at build time. On GPUs the trainer steps with torch's
# fused AdamW, so no other DeepSpeed op is needed.
# 25.12: PyTorch 2.10, CUDA 13.1, Python 3.12. The fused attention kernel compiles under
# Triton 3.5.1, 3.6.0 and 3.9.0 (python -m deberta_ds.kernels.compile_check; README, GPUs).
#
#   docker build -t deberta_ds .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v /data:/data -v $PWD/runs:/workspace/deberta_ds/runs \
#     -e TRAIN_SHARDS=/data/shards -e TOKENIZER=/data/tok -e RECIPE=base deberta_ds bash launch_scripts/pretrain.sh
FROM nvcr.io/nvidia/pytorch:25.12-py3

ENV DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 TORCH_CUDA_ARCH_LIST="8.0 9.0" PYTHONUNBUFFERED=1
WORKDIR /workspace/deberta_ds

COPY requirements.txt ./
# torch>=2.4 is already satisfied by the image's build, so pip keeps the NGC torch. NGC images
# from 25.03 on pin every package they ship in /etc/pip/constraint.txt; our own pins win here.
RUN PIP_CONSTRAINT= pip install --no-cache-dir --no-build-isolation -r requirements.txt && ds_report

COPY setup.py README.md ./
COPY deberta_ds deberta_ds
COPY ds_configs ds_configs
COPY data_prep data_prep
COPY launch_scripts launch_scripts
# A regular (not editable) install, as a cluster's shared environment has it: the DeepSpeed
# configurations (ds_configs/) and recipes travel inside the package (deberta_ds/resources.py).
# The extras carry what the image's other commands need: fine-tuning (hf) and `convert to-onnx`
# (onnx); the requirements above are installed already, so pip adds only the extras' packages.
RUN PIP_CONSTRAINT= pip install --no-cache-dir --no-build-isolation ".[hf,onnx]" && rm -rf build

CMD ["bash", "launch_scripts/pretrain.sh", "--help"]
