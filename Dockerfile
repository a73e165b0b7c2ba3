# deberta_ds on an NVIDIA PyTorch (NGC) image: CUDA, PyTorch and apex (fused LayerNorm, FusedAdam,
# FusedLAMB) come with the base image; deepspeed, sentencepiece and tensorboard are installed at
# the versions pinned in requirements.txt (the same file setup.py reads), with DeepSpeed's
# FusedAdam, FusedLAMB, CPUAdam and utils ops compiled at build time.
#
#   docker build -t deberta_ds .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v /data:/data -v $PWD/runs:/workspace/deberta_ds/runs \
#     -e TRAIN_SHARDS=/data/shards -e TOKENIZER=/data/tok -e PRESET=base deberta_ds bash launch_scripts/pretrain.sh
FROM nvcr.io/nvidia/pytorch:24.10-py3

ENV DS_BUILD_FUSED_ADAM=1 DS_BUILD_FUSED_LAMB=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 \
    TORCH_CUDA_ARCH_LIST="8.0 9.0" PYTHONUNBUFFERED=1
WORKDIR /workspace/deberta_ds

COPY requirements.txt ./
# torch>=2.4 is already satisfied by the image's build, so pip keeps the NGC torch.
RUN pip install --no-cache-dir --no-build-isolation -r requirements.txt && ds_report

COPY setup.py README.md ./
COPY deberta_ds deberta_ds
COPY data_prep data_prep
COPY ds_configs ds_configs
COPY launch_scripts launch_scripts
RUN pip install --no-cache-dir --no-deps -e .

CMD ["bash", "launch_scripts/pretrain.sh", "--help"]
