# Prints the sweep's table from the report JSONs next to this file: KL beyond the window, ratio to the Hadamard RTN
# bundle (--error-feedback off) measured by the same binary, p99 KL and top-1 beyond the window.
# python3 bench/results/cpu-spectral/ef-sweep/summary.py
import json, os
here = os.path.dirname(os.path.abspath(__file__))
names = ['off', 'kv-d0.01', 'kv-d0.03', 'kv-d0.1', 'kv-d0.3', 'kv-d1.0', 'k-d0.03', 'k-d0.1']
def get(p, n):
    r = json.load(open(os.path.join(here, f'report-{p}-{n}.json')))
    return [x for x in r['results'] if x['mode'] == 'oscar'][0]['beyond_windows']
base = {p: get(p, 'off')['kl_mean'] for p in ['eval', 'moby', 'tiny']}
for n in names:
    row = [n]
    for p in ['eval', 'moby', 'tiny']:
        o = get(p, n)
        row.append(f"{p} {o['kl_mean']:.3e} {o['kl_mean'] / base[p]:.3f}x p99 {o['kl_p99']:.3g} "
                   f"top1 {100 * o['top1_agreement']:.1f} n {o['positions']}")
    print(' | '.join(row))
