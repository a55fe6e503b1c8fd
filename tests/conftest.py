"""Shared fixtures: tiny random causal LMs of every supported architecture (and saved checkpoints of
them), the real SmolLM2 tokenizer, a word-level tokenizer that adds BOS with a text over its
vocabulary, a real 2:4 prune of the packaged SmolLM2-135M, MNIST and cnn sweep configs.

``tiny_model`` and ``ARCHS`` stay module-level names: scripts/check_identical_masks.py imports them
by path. Tests use the fixtures (``make_tiny``, ``arch``, ...) and never import this file."""
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
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, **common)
        m = tf.Qwen3ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = tf.MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                               num_key_value_heads=2, **common)
        m = tf.MistralForCausalLM(cfg)
    elif arch == "phi3":     # fused qkv_proj and gate_up_proj: one Linear each, one input
        cfg = tf.Phi3Config(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                            num_key_value_heads=2, pad_token_id=0, **common)
        m = tf.Phi3ForCausalLM(cfg)
    elif arch == "opt":
        cfg = tf.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_attention_heads=4,
                           word_embed_proj_dim=hidden, max_position_embeddings=512, **common)
        m = tf.OPTForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=512)
        m = tf.GPT2LMHeadModel(cfg)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common)
        m = tf.MixtralForCausalLM(cfg)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True, **common)
        m = tf.Qwen3MoeForCausalLM(cfg)
    elif arch == "olmoe":
        cfg = tf.OlmoeConfig(hidden_size=hidden, intermediate_size=hidden, num_attention_heads=4,
                             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, **common)
        m = tf.OlmoeForCausalLM(cfg)
    elif arch == "qwen2_moe":    # routed experts + a shared expert behind a sigmoid gate
        cfg = tf.Qwen2MoeConfig(hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden,
                                shared_expert_intermediate_size=hidden, num_attention_heads=4,
                                num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                decoder_sparse_step=1, **common)
        m = tf.Qwen2MoeForCausalLM(cfg)
    elif arch == "deepseek_v3":  # MLA attention, a dense first block, then shared + routed experts
        cfg = tf.DeepseekV3Config(hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden,
                                  num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                                  num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                                  first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                                  qk_nope_head_dim=4, v_head_dim=8, **common)
        m = tf.DeepseekV3ForCausalLM(cfg)
    elif arch == "gpt_oss":      # experts stored transposed (experts, d_in, d_out), with biases
        cfg = tf.GptOssConfig(hidden_size=hidden, intermediate_size=hidden, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                              sliding_window=16, **common)
        m = tf.GptOssForCausalLM(cfg)
        with torch.no_grad():    # random expert and router biases (initialised to zero)
            for n, p in m.named_parameters():
                if ".mlp." in n and n.endswith("bias"):
                    p.normal_(0, 0.02)
    else:
        raise ValueError(arch)
    return m.eval()


ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3", "opt", "gpt2")
MOE_ARCHS = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss")


@pytest.fixture(scope="session")
def make_tiny():
    """Factory of tiny random causal LMs: ``make_tiny(arch, vocab, hidden=32, layers=2, seed=0)``."""
    return tiny_model


@pytest.fixture
def save_tiny(tmp_path, tokenizer, make_tiny):
    """Factory ``save_tiny(arch="llama", name="base", dtype=None, **kw) -> (folder, model)``: the tiny
    model ``make_tiny(arch, len(tokenizer), **kw)`` (cast to ``dtype`` if given) saved with the
    SmolLM2 tokenizer into ``tmp_path / name``."""
    def save(arch: str = "llama", name: str = "base", dtype=None, **kw):
        m = make_tiny(arch, len(tokenizer), **kw)
        if dtype is not None:
            m = m.to(dtype)
        d = tmp_path / name
        m.save_pretrained(d)
        tokenizer.save_pretrained(d)
        return d, m
    return save


@pytest.fixture
def layer_64x128():
    """(W, G): a random (64, 128) float32 weight and the float64 Gram matrix of 512 random inputs
    with per-feature scales in [0, 1) (so columns differ in norm, as in real layers)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g)
    X = torch.randn(128, 512, generator=g) * torch.rand(128, 1, generator=g)
    return W, (X @ X.T).double()


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    """Every supported architecture in turn (a test taking ``arch`` runs once per architecture)."""
    return request.param


@pytest.fixture(params=MOE_ARCHS)
def moe_arch(request) -> str:
    """Every mixture-of-experts architecture in turn."""
    return request.param


@pytest.fixture
def mnist():
    """Skips the test unless the offline MNIST files are installed (bash scripts/setup.sh)."""
    if not have_mnist():
        pytest.skip("MNIST not installed (bash scripts/setup.sh)")


@pytest.fixture
def sweep_config(tmp_path):
    """``sweep_config(path)``: a cnn sweep config shrunk for a smoke test (:func:`tiny_sweep_config`)."""
    return lambda path: tiny_sweep_config(path, tmp_path)


WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="session")
def bos_tokenizer():
    """A word-level tokenizer that, like Llama's and Gemma's, puts <bos> (id 2) before every text;
    decoding joins words with spaces, so decode -> encode gives back the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="session")
def bos_text_file(tmp_path_factory) -> str:
    """Path of a 6,000-word text over :func:`bos_tokenizer`'s vocabulary with some structure (a random
    walk), so a tiny model's predictions are not all alike."""
    g = torch.Generator().manual_seed(1)
    steps = torch.randint(-3, 4, (6000,), generator=g).cumsum(0) % len(WORDS)
    p = tmp_path_factory.mktemp("text") / "walk.txt"
    p.write_text(" ".join(WORDS[i] for i in steps.tolist()))
    return str(p)


@pytest.fixture(scope="session")
def pruned_24(tmp_path_factory):
    """A real 2:4 prune of the packaged SmolLM2-135M (Wanda, tiny calibration: ~30 s), saved once per
    session. Attributes: ``folder`` (the saved checkpoint), ``report`` (its report dict),
    ``token_ids`` (one short prompt, [[...]]) and ``logits`` (the pruned model's on it)."""
    from types import SimpleNamespace

    from sparsefw import api

    token_ids = [[1, 504, 3458, 282, 253, 1345, 30, 378, 2162, 314, 15, 2]]
    out = tmp_path_factory.mktemp("pub") / "smollm2-24"
    res = api.prune("smollm2-135m", output=str(out), method="wanda", pattern="2:4", nsamples=2, seqlen=64,
                    eval_ppl=True, ppl_chunks=2, ppl_seqlen=64, progress=False)
    with torch.no_grad():
        logits = res.model(torch.tensor(token_ids)).logits
    return SimpleNamespace(folder=out, report=res.report, token_ids=token_ids, logits=logits)


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
