// Router: logits [T, E] (f32) -> ids [T, k] (u32), weights [T, k] (f32).
//
// One invocation per token; every loop runs over E (or the groups), so any
// E and k work. The contract (moe_hal_core::spec):
// - NaN logits count as -inf. Softmax over a row whose maximum is +inf shares
//   the weight among the +inf entries; an all -inf row gives zeros. Sigmoid
//   maps +inf to 1 and -inf to 0. Non-finite values are recognised from their
//   bits, never by float comparisons that a compiler may assume finite. Scores
//   below f32's normal range are 0.
// - Selection scores c = s + bias; groups scored by top-2 sum or max; kept
//   groups by score descending, ties to the lower group id; top-k by c
//   descending, ties to the lower expert id. Comparisons use an integer key
//   that orders floats exactly, and scores are flushed as the contract says,
//   so neither fast-math nor a driver's flush-to-zero changes a choice.
// - Weights are the unbiased s, renormalised (none / sum, zero sum leaves 0 /
//   sum + eps), times routed_scaling_factor.
//
// Scratch per token (u32 bits of f32): [0, E) scores s, [E, E + G) group
// scores, [E + G, E + 2G) kept flags; tokens past what one binding of it
// holds run in further dispatches (t0).

struct Params {
    tokens: u32,
    experts: u32,
    top_k: u32,
    // 0: softmax, 1: sigmoid.
    scoring: u32,
    has_bias: u32,
    n_group: u32,
    topk_group: u32,
    // 0: no groups, 1: top-2 sum, 2: max.
    group_score: u32,
    // 0: none, 1: sum, 2: sum + eps.
    renorm: u32,
    eps: f32,
    scale: f32,
    stride: u32,
    // The tokens of this dispatch, [t0, t1), each with its scratch at (t - t0) * stride (the
    // host cuts the tokens so that the scratch binds at once; the grid's last workgroup may
    // reach past t1).
    t0: u32,
    t1: u32,
    p2: u32,
    p3: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<u32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> weights: array<f32>;
@group(0) @binding(5) var<storage, read_write> scratch: array<u32>;

const POS_INF: u32 = 0x7f800000u;
const NEG_INF: u32 = 0xff800000u;

// NaN -> -inf, from the bits.
fn clean(b: u32) -> u32 {
    if ((b & 0x7fffffffu) > POS_INF) {
        return NEG_INF;
    }
    return b;
}

// key_bits and better: select.wgsl (NaN keys lowest; route cleans NaN logits before).
fn key(x: f32) -> u32 {
    return key_bits(bitcast<u32>(x));
}

fn score(base: u32, i: u32) -> f32 {
    return bitcast<f32>(scratch[base + i]);
}

// Selection score c = s + bias as an order key.
fn sel_key(base: u32, i: u32) -> u32 {
    var c = score(base, i);
    if (p.has_bias != 0u) {
        c = c + bias[i];
    }
    return key(c);
}

// The contract's flush: a score below f32's normal range is 0, whether or not the driver keeps
// subnormals (under flush-to-zero a subnormal compares as 0, below the bound, all the same).
fn flush(v: f32) -> f32 {
    if (v < 1.17549435e-38) {
        return 0.0;
    }
    return v;
}

fn softmax(row: u32, base: u32) {
    let e = p.experts;
    var mb = NEG_INF;
    for (var i = 0u; i < e; i++) {
        let b = clean(logits[row + i]);
        if (key_bits(b) > key_bits(mb)) {
            mb = b;
        }
    }
    if (mb == POS_INF) {
        var n = 0u;
        for (var i = 0u; i < e; i++) {
            if (logits[row + i] == POS_INF) {
                n++;
            }
        }
        let share = 1.0 / f32(n);
        for (var i = 0u; i < e; i++) {
            var v = 0.0;
            if (logits[row + i] == POS_INF) {
                v = share;
            }
            scratch[base + i] = bitcast<u32>(v);
        }
        return;
    }
    if (mb == NEG_INF) {
        for (var i = 0u; i < e; i++) {
            scratch[base + i] = 0u;
        }
        return;
    }
    let m = bitcast<f32>(mb);
    var sum = 0.0;
    for (var i = 0u; i < e; i++) {
        let b = clean(logits[row + i]);
        var v = 0.0;
        if (b != NEG_INF) {
            v = exp(bitcast<f32>(b) - m);
        }
        sum += v;
        scratch[base + i] = bitcast<u32>(v);
    }
    for (var i = 0u; i < e; i++) {
        scratch[base + i] = bitcast<u32>(flush(bitcast<f32>(scratch[base + i]) / sum));
    }
}

fn sigmoid(row: u32, base: u32) {
    for (var i = 0u; i < p.experts; i++) {
        let b = clean(logits[row + i]);
        var v = 0.0;
        if (b == POS_INF) {
            v = 1.0;
        } else if (b != NEG_INF) {
            v = flush(1.0 / (1.0 + exp(-bitcast<f32>(b))));
        }
        scratch[base + i] = bitcast<u32>(v);
    }
}

// Group scores and kept flags (all groups kept when there are none).
fn groups(base: u32) {
    let g_n = p.n_group;
    let size = p.experts / g_n;
    let gs = base + p.experts;
    let kept = gs + g_n;
    if (p.group_score == 0u) {
        for (var g = 0u; g < g_n; g++) {
            scratch[kept + g] = 1u;
        }
        return;
    }
    for (var g = 0u; g < g_n; g++) {
        var m1 = NEG_INF;
        var m2 = NEG_INF;
        for (var i = g * size; i < (g + 1u) * size; i++) {
            var c = score(base, i);
            if (p.has_bias != 0u) {
                c = c + bias[i];
            }
            let cb = bitcast<u32>(c);
            if (key_bits(cb) > key_bits(m1)) {
                m2 = m1;
                m1 = cb;
            } else if (key_bits(cb) > key_bits(m2)) {
                m2 = cb;
            }
        }
        var v = bitcast<f32>(m1);
        if (p.group_score == 1u) {
            v = v + bitcast<f32>(m2);
        }
        scratch[gs + g] = bitcast<u32>(v);
        scratch[kept + g] = 0u;
    }
    // Iterative selection: each pick is the best group ranked after the previous pick.
    var prev = 0xffffffffu;
    var prev_key = 0u;
    for (var r = 0u; r < p.topk_group; r++) {
        var best = 0xffffffffu;
        var best_key = 0u;
        for (var g = 0u; g < g_n; g++) {
            let kg = key_bits(scratch[gs + g]);
            if (prev != 0xffffffffu && !better(prev_key, prev, kg, g)) {
                continue;
            }
            if (best == 0xffffffffu || better(kg, g, best_key, best)) {
                best = g;
                best_key = kg;
            }
        }
        if (best == 0xffffffffu) {
            break;
        }
        scratch[kept + best] = 1u;
        prev = best;
        prev_key = best_key;
    }
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let t = p.t0 + (wg.x + wg.y * nwg.x) * 64u + li;
    if (t >= p.t1) {
        return;
    }
    let e = p.experts;
    let k = p.top_k;
    let row = t * e;
    let base = (t - p.t0) * p.stride;
    if (p.scoring == 0u) {
        softmax(row, base);
    } else {
        sigmoid(row, base);
    }
    groups(base);
    let size = e / p.n_group;
    let kept = base + e + p.n_group;
    var prev = 0xffffffffu;
    var prev_key = 0u;
    var sum = 0.0;
    for (var j = 0u; j < k; j++) {
        var best = 0xffffffffu;
        var best_key = 0u;
        for (var i = 0u; i < e; i++) {
            if (scratch[kept + i / size] == 0u) {
                continue;
            }
            let ki = sel_key(base, i);
            if (prev != 0xffffffffu && !better(prev_key, prev, ki, i)) {
                continue;
            }
            if (best == 0xffffffffu || better(ki, i, best_key, best)) {
                best = i;
                best_key = ki;
            }
        }
        // A valid spec always leaves k candidates; stay in bounds regardless.
        if (best == 0xffffffffu) {
            best = 0u;
        }
        let s = score(base, best);
        ids[t * k + j] = best;
        weights[t * k + j] = s;
        sum += s;
        prev = best;
        prev_key = best_key;
    }
    var div = 1.0;
    if (p.renorm == 1u) {
        if (sum > 0.0) {
            div = sum;
        }
    } else if (p.renorm == 2u) {
        if (sum + p.eps > 0.0) {
            div = sum + p.eps;
        }
    }
    for (var j = 0u; j < k; j++) {
        weights[t * k + j] = weights[t * k + j] / div * p.scale;
    }
}
