"""Reference training step of VSE++ (precomputed features) in PyTorch, for side-by-side timing.

Run by `benchmarks/vs_pytorch.py` in an interpreter that has torch (ccr_jax does not depend on it);
alone: `python benchmarks/vsepp_torch_step.py --device cpu --batch 128`.

Model and loss follow the published VSE++ defaults: image features 2048 -> Linear -> 1024, L2 norm;
word embedding 300 -> GRU 1024 (packed, last state at true length), L2 norm; hinge loss with hardest
negatives, margin 0.2, summed; Adam 2e-4; gradient clipping 2.0. Prints one JSON line.
Caption lengths are drawn as `benchmarks.train_throughput.caption_lengths` draws ours (2 + Poisson,
COCO-like, mean 12.5 tokens) unless --normal_lengths (the first GPU runs' lengths: N(12.5, 3.5) in [7, 32]).
Needs only torch and NumPy (a CUDA build of torch for --device cuda); it imports nothing of ccr_jax.
"""
import argparse, json, time
import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


def l2norm(x):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class VSE(nn.Module):
    def __init__(self, img_dim, vocab, word_dim, embed):
        super().__init__()
        self.fc = nn.Linear(img_dim, embed)
        self.emb = nn.Embedding(vocab, word_dim)
        self.gru = nn.GRU(word_dim, embed, 1, batch_first=True)

    def forward(self, images, captions, lengths):
        im = l2norm(self.fc(images))
        packed = pack_padded_sequence(self.emb(captions), lengths, batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)
        return im, l2norm(h[-1])


def vsepp_loss(im, s, margin=0.2):
    scores = im @ s.t()
    d = scores.diag().view(-1, 1)
    cost_s = (margin + scores - d).clamp(min=0)
    cost_im = (margin + scores - d.t()).clamp(min=0)
    mask = torch.eye(scores.size(0), dtype=torch.bool, device=scores.device)
    cost_s = cost_s.masked_fill(mask, 0)
    cost_im = cost_im.masked_fill(mask, 0)
    return cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img_dim", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--word_dim", type=int, default=300)
    p.add_argument("--embed", type=int, default=1024)
    p.add_argument("--max_len", type=int, default=32)
    p.add_argument("--coco_lengths", action="store_true", help="ignored: COCO-like lengths are the default")
    p.add_argument("--normal_lengths", action="store_true")
    p.add_argument("--mean_len", type=float, default=12.5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    dev = torch.device(a.device)
    model = VSE(a.img_dim, a.vocab, a.word_dim, a.embed).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    images = torch.from_numpy(rng.standard_normal((a.batch, a.img_dim), dtype=np.float32)).to(dev)
    if a.normal_lengths:  # COCO captions: about 10.5 words + <start>/<end>
        lengths = np.clip(np.rint(rng.normal(12.5, 3.5, size=a.batch)), 7, a.max_len).astype(np.int64)
    else:  # as train_throughput.caption_lengths
        lengths = np.clip(2 + rng.poisson(max(a.mean_len - 2.0, 0.0), size=a.batch), min(3, a.max_len),
                          a.max_len).astype(np.int64)
    caps = torch.from_numpy(rng.integers(4, a.vocab, size=(a.batch, a.max_len))).to(dev)
    lens = torch.from_numpy(lengths)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        im, s = model(images, caps, lens)
        loss = vsepp_loss(im, s)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        float(loss.detach())
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    print(json.dumps({"impl": "pytorch-vsepp", "torch": torch.__version__, "threads": torch.get_num_threads(), "device": a.device,
                      "batch": a.batch, "mean_len": float(lengths.mean()), "step_s_median": med,
                      "pairs_per_s": a.batch / med}))


if __name__ == "__main__":
    main()
