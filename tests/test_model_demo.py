"""model.py on the real demo checkpoint (SmolLM2-135M-Instruct, fp32) from `python data.py fetch-demo`:
it loads, answers a chat question sensibly, and has a sane perplexity on held-out Wikipedia text."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model as M

pytestmark = pytest.mark.demo_assets
WINDOW, N_WINDOWS = 256, 3


@pytest.fixture(scope="module")
def demo(assets: Path):
    path = assets / "smollm2-135m"
    return M.from_pretrained(path, dtype=torch.float32).eval(), M.Tokenizer.from_pretrained(path)


def test_demo_checkpoint_loads(demo):
    m, tok = demo
    c = m.config
    assert c.model_type == "llama" and c.num_hidden_layers == len(m.model.layers)
    assert len(M.linear_names(m)) == 7 * c.num_hidden_layers
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in m.parameters())
    assert tok.eos_id is not None and tok.chat_format == "chatml"
    assert m.model.embed_tokens.weight.shape == (c.vocab_size, c.hidden_size)


def test_greedy_answer_names_paris(demo):
    m, tok = demo
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = M.generate(m, [tok.encode(prompt)], max_new_tokens=16, eos_id=tok.eos_ids)[0]
    answer = tok.decode(out, skip_special_tokens=True)
    assert "Paris" in answer, answer


@torch.no_grad()
def test_perplexity_on_heldout_wikipedia(demo, assets):
    m, tok = demo
    text = (assets / "wikitext" / "test.txt").read_text()[:60_000]
    ids = torch.tensor(tok.encode(text))
    assert len(ids) >= N_WINDOWS * WINDOW * 2, "held-out text too short"
    starts = torch.linspace(0, len(ids) - WINDOW, N_WINDOWS).long()
    batch = torch.stack([ids[s:s + WINDOW] for s in starts])                      # (N, WINDOW)
    logits = m(batch)                                                              # (N, WINDOW, V)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
    ppl = math.exp(nll.item())
    assert math.isfinite(ppl) and ppl < 40, ppl
