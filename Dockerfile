# sieve-pl on a CUDA PyTorch base. Mount the run directory and the Hugging Face cache:
#   docker run --gpus all -v $PWD/checkpoints:/work/checkpoints -v $HOME/.cache/huggingface:/root/.cache/huggingface \
#     sieve-pl fit --config configs/demo.yaml
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /work
COPY pyproject.toml README.md install.sh ./
COPY sieve_pl ./sieve_pl
COPY configs ./configs
# keep the base image's CUDA torch; install the package and the offline demo model/data
RUN SIEVE_PL_TORCH="" bash install.sh && pip cache purge

VOLUME ["/work/checkpoints", "/root/.cache/huggingface"]
ENTRYPOINT ["sieve-pl"]
CMD ["fit", "--help"]
