"""bench/bench_step.py's measuring helpers on a tiny model (the benchmark itself needs the demo checkpoint)."""
import gc
import sys
import warnings
from pathlib import Path

import torch

import model as M

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_step  # noqa: E402


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():    # isinstance on torch.distributed.reduce_op warns that it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


def test_saved_bytes_counts_activations_and_keeps_none_alive():
    cfg = M.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = M.init_weights(M.LlamaForCausalLM(cfg), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    ids1, ids4 = (torch.randint(0, 64, (b, 16), generator=g) for b in (1, 4))
    bench_step.saved_bytes(model, ids1, "full")                         # warm-up: lazily built buffers
    before = live_tensors()
    s1 = bench_step.saved_bytes(model, ids1, "full")
    s4 = bench_step.saved_bytes(model, ids4, "full")
    # the counting pass must free its graph (a node holding its own output would keep every activation alive)
    assert live_tensors() == before
    # distinct storages are counted once each, and all stay alive during the pass, so 4x the tokens save
    # about 4x the bytes (freed and reused memory would collapse them)
    assert s1 > 0 and 3.0 * s1 < s4 < 5.0 * s1
