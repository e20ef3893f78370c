"""Paired comparison of aggregator steps as calls vs as one session, over the requests whose answers
came out the same in both (a `benchmarks/bench_session.sh` results folder):

    .venv/bin/python benchmarks/session_paired.py benchmarks/results/session/live-cpu-greedy
"""
import pandas as pd, sys
d = sys.argv[1]
def calls(p):
    c = pd.read_parquet(f"{d}/traces/{p}.chunks.parquet"); agg = c[c.node == "agg"]
    k = agg.groupby(["request_id", "call"]).agg(prompt=("prompt_tokens", "max"), cached=("cached_tokens", "max"),
                                                 sent=("sent_s", "min"), first=("first_token_s", "min")).reset_index()
    k["prefilled"] = k.prompt - k.cached; k["wait"] = k["first"] - k["sent"]
    return k
for x, y in [("staircase-prefix-cache-r1", "staircase-session-r1"), ("staircase-smooth-r1", "staircase-smooth-session-r1")]:
    a = pd.read_parquet(f"{d}/traces/{x}.requests.parquet"); b = pd.read_parquet(f"{d}/traces/{y}.requests.parquet")
    same = a.request_id[(a.answer_text == b.answer_text).to_numpy()]
    ca, cb = calls(x), calls(y)
    m = ca.merge(cb, on=["request_id", "call"], suffixes=("_c", "_s"))
    m = m[m.request_id.isin(same) & (m.call > 0)]
    ra, rb = a.set_index("request_id").loc[same], b.set_index("request_id").loc[same]
    print(f"{x} vs {y}: {len(same)} requests with the same answer, {len(m)} later aggregator steps")
    print(f"  later-step prefilled tokens: mean {m.prefilled_c.mean():.1f} -> {m.prefilled_s.mean():.1f} (sum ratio {m.prefilled_s.sum()/m.prefilled_c.sum():.3f})")
    print(f"  later-step first-token wait s: median {m.wait_c.median():.4f} -> {m.wait_s.median():.4f}; mean {m.wait_c.mean():.4f} -> {m.wait_s.mean():.4f}; session faster in {(m.wait_s < m.wait_c).mean():.2f} of steps")
    print(f"  request prefilled: {(ra.prompt_tokens-ra.cached_tokens).mean():.1f} -> {(rb.prompt_tokens-rb.cached_tokens).mean():.1f}; TTFT p50 {ra.ttft_s.median():.3f} -> {rb.ttft_s.median():.3f}; stall p50 {ra.longest_stall_s.median():.3f} -> {rb.longest_stall_s.median():.3f}; E2E p50 {ra.e2e_s.median():.3f} -> {rb.e2e_s.median():.3f}")
