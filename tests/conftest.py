"""Shared fixtures: tiny random causal LMs of every supported architecture, and a real tokenizer."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny problems: one thread is fastest and robust on a shared machine


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer (packaged model; converted from GGUF into the cache once)."""
    from transformers import AutoTokenizer

    from sparsefw.models import packaged_model_dir

    return AutoTokenizer.from_pretrained(str(packaged_model_dir("smollm2-135m")))


def tiny_model(arch: str, vocab: int, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A tiny random causal LM (float32, eval mode) of the given architecture."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, num_hidden_layers=layers)
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        m = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        m = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, sliding_window=16,
                                  **common)
        m = tf.Gemma3ForCausalLM(cfg)
    elif arch == "opt":
        cfg = tf.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_attention_heads=4,
                           word_embed_proj_dim=hidden, max_position_embeddings=512, **common)
        m = tf.OPTForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=512)
        m = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    return m.eval()


ARCHS = ("llama", "qwen2", "gemma3", "opt", "gpt2")


def have_mnist() -> bool:
    """True if the offline MNIST files are installed (bash scripts/setup.sh)."""
    from cnn.data import load_split
    from sparsefw.errors import SparseFWError

    try:
        load_split("mnist", "test")
        return True
    except SparseFWError:
        return False


def tiny_sweep_config(path: str, tmp_path) -> dict:
    """A cnn sweep config shrunk for a smoke test: checkpoints under tmp_path, 1500 / 300 images,
    4 fine-tuning steps."""
    from cnn.experiments import load_config

    cfg = load_config(path)
    cfg.update(ckpt_dir=str(tmp_path / "ckpt"), data={"train_subset": 1500, "test_subset": 300})
    cfg["finetune"]["steps"] = 4
    return cfg
