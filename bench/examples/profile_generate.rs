//! Where a decode step's time goes: `cargo run --release -p prime-bench --example
//! profile_generate -- MODEL_DIR BATCH` times the pieces of one step (one torch thread, a
//! 32-token prompt in the cache) at the given batch, each the mean of 200 runs, after whole
//! `generate` runs (32 + 1 and 32 + 64 tokens) and the prefill, the mean of 5. A diagnostic
//! for docs/benchmarks.md, not a benchmark against anything.
use std::time::Instant;

use prime_model::generate::{sample, SamplingParams};
use prime_model::kv_cache::KvCache;
use prime_model::logprobs::position_ids;
use prime_model::CausalLm;
use tch::{Device, Kind, Tensor};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let batch: i64 = args[2].parse().unwrap();
    tch::set_num_threads(1);
    let _guard = tch::no_grad_guard();
    let lm = CausalLm::load(&dir, Device::Cpu, Kind::Float, Kind::Float).unwrap();
    let model = &lm.model;
    let c = &lm.config;
    let (d, h, kv, hd, v) = (
        c.hidden_size,
        c.num_attention_heads,
        c.num_kv_heads(),
        c.head_dim(),
        c.vocab_size,
    );
    let prompt = 32;
    let cap = 96;
    let ids = Tensor::randint(v, [batch, prompt], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([batch, cap], (Kind::Bool, Device::Cpu));
    let mut cache = KvCache::new(model, batch, cap);
    cache.target_block(0, batch, 0);
    let pm = mask.narrow(1, 0, prompt);
    let _ = model.forward(&ids, &position_ids(&pm), &pm, Some(&mut cache));
    let params = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    };
    let n = 200;
    let tok = Tensor::randint(v, [batch, 1], (Kind::Int64, Device::Cpu));
    let pos = Tensor::full([batch, 1], prompt, (Kind::Int64, Device::Cpu));
    let cols = Tensor::full([batch], prompt, (Kind::Int64, Device::Cpu));
    let km = mask.narrow(1, 0, prompt + 1);
    let time = |name: &str, f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        println!(
            "{name:<24} {:8.3} ms",
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        );
    };
    let prompts: Vec<Vec<i64>> = (0..batch)
        .map(|i| (0..prompt).map(|j| (i * 131 + j * 7) % v).collect())
        .collect();
    let gen_params = SamplingParams {
        max_new_tokens: 64,
        temperature: 1.0,
        seed: Some(1),
        ..SamplingParams::default()
    };
    for new_tokens in [1, 64] {
        let gen_params = SamplingParams {
            max_new_tokens: new_tokens,
            ..gen_params.clone()
        };
        let t = Instant::now();
        for _ in 0..5 {
            let _ = prime_model::generate(model, &prompts, &gen_params).unwrap();
        }
        println!(
            "{:<24} {:8.3} ms",
            format!("generate 32 + {new_tokens} (run)"),
            t.elapsed().as_secs_f64() * 1e3 / 5.0
        );
    }
    let mut prefill_cache = KvCache::new(model, batch, cap);
    let t = Instant::now();
    for _ in 0..5 {
        prefill_cache.target_block(0, batch, 0);
        let _ = model.forward(&ids, &position_ids(&pm), &pm, Some(&mut prefill_cache));
    }
    println!(
        "{:<24} {:8.3} ms",
        "prefill forward",
        t.elapsed().as_secs_f64() * 1e3 / 5.0
    );
    let mut hidden = Tensor::zeros([batch, 1, d], (Kind::Float, Device::Cpu));
    time("decode forward", &mut || {
        cache.target_per_slot(&cols, prompt + 1);
        hidden = model.forward(&tok, &pos, &km, Some(&mut cache));
    });
    let cols_late = Tensor::full([batch], cap - 1, (Kind::Int64, Device::Cpu));
    time("decode forward, 96 keys", &mut || {
        cache.target_per_slot(&cols_late, cap);
        hidden = model.forward(&tok, &pos, &mask, Some(&mut cache));
    });
    let km1 = mask.narrow(1, 0, 1);
    time("forward no cache t=1", &mut || {
        let _ = model.forward(&tok, &pos, &km1, None);
    });
    let emb = Tensor::randn([batch, 1, d], (Kind::Float, Device::Cpu));
    time("layers by hand", &mut || {
        for layer in &model.layers {
            let a = &layer.self_attn;
            let normed = layer.input_layernorm.forward(&emb);
            let q = a
                .q_proj
                .forward(&normed)
                .view([batch, 1, h, hd])
                .transpose(1, 2);
            let k = a
                .k_proj
                .forward(&normed)
                .view([batch, 1, kv, hd])
                .transpose(1, 2);
            let v = a
                .v_proj
                .forward(&normed)
                .view([batch, 1, kv, hd])
                .transpose(1, 2);
            let y = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                false,
                None::<f64>,
                true,
            );
            let o = a.o_proj.forward(&y.transpose(1, 2).reshape([batch, 1, d]));
            let h2 = &emb + o;
            let m = &layer.mlp;
            let x2 = layer.post_attention_layernorm.forward(&h2);
            let _ = &h2
                + m.down_proj
                    .forward(&(m.gate_proj.forward(&x2).silu() * m.up_proj.forward(&x2)));
        }
    });
    let mut logits = Tensor::zeros([batch, v], (Kind::Float, Device::Cpu));
    time("lm head", &mut || {
        logits = model.logits(&hidden.select(1, 0));
    });
    time("sample", &mut || {
        let _ = sample(&logits, &params);
    });
    time("multinomial", &mut || {
        let _ = logits.softmax(-1, Kind::Float).multinomial(1, false);
    });
    time("host copy", &mut || {
        let (t, l) = sample(&logits, &params);
        let _ = Vec::<i64>::try_from(&t).unwrap();
        let _ = Vec::<f32>::try_from(&l).unwrap();
    });
    let q = Tensor::randn([batch, h, 1, hd], (Kind::Float, Device::Cpu));
    let kfull = Tensor::randn([batch, kv, cap, hd], (Kind::Float, Device::Cpu));
    let k = kfull.narrow(2, 0, prompt + 1);
    let m4 = km.view([batch, 1, 1, prompt + 1]);
    time("sdpa gqa bool mask", &mut || {
        let _ = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &k,
            Some(&m4),
            0.0,
            false,
            None::<f64>,
            true,
        );
    });
    let kr = k.repeat_interleave_self_int(h / kv, 1, None::<i64>);
    time("sdpa mha bool mask", &mut || {
        let _ = Tensor::scaled_dot_product_attention(
            &q,
            &kr,
            &kr,
            Some(&m4),
            0.0,
            false,
            None::<f64>,
            false,
        );
    });
    let fm = Tensor::zeros([batch, 1, 1, prompt + 1], (Kind::Float, Device::Cpu));
    time("sdpa gqa float mask", &mut || {
        let _ = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &k,
            Some(&fm),
            0.0,
            false,
            None::<f64>,
            true,
        );
    });
    time("sdpa gqa no mask", &mut || {
        let _ = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &k,
            None::<Tensor>,
            0.0,
            false,
            None::<f64>,
            true,
        );
    });
    let idx = cols
        .view([batch, 1, 1, 1])
        .expand([batch, kv, 1, hd], false);
    let kn = Tensor::randn([batch, kv, 1, hd], (Kind::Float, Device::Cpu));
    let mut kf2 = kfull.shallow_clone();
    time("scatter", &mut || {
        let _ = kf2.scatter_(2, &idx, &kn);
    });
    let x = Tensor::randn([batch, 1, d], (Kind::Float, Device::Cpu));
    let layer = &model.layers[0];
    time("one mlp", &mut || {
        let _ = layer
            .mlp
            .down_proj
            .forward(&(layer.mlp.gate_proj.forward(&x).silu() * layer.mlp.up_proj.forward(&x)));
    });
    time("one rmsnorm", &mut || {
        let _ = layer.input_layernorm.forward(&x);
    });
    time("qkv proj", &mut || {
        let _ = layer.self_attn.q_proj.forward(&x);
        let _ = layer.self_attn.k_proj.forward(&x);
        let _ = layer.self_attn.v_proj.forward(&x);
    });
    let a = &layer.self_attn;
    let bias = |l: &prime_model::qwen2::Linear| l.bias.as_ref().unwrap().shallow_clone();
    let qkv_w = Tensor::cat(&[&a.q_proj.weight, &a.k_proj.weight, &a.v_proj.weight], 0);
    let qkv_b = Tensor::cat(&[bias(&a.q_proj), bias(&a.k_proj), bias(&a.v_proj)], 0);
    time("qkv proj fused", &mut || {
        let _ = x.linear(&qkv_w, Some(&qkv_b));
    });
    let m = &layer.mlp;
    let gu_w = Tensor::cat(&[&m.gate_proj.weight, &m.up_proj.weight], 0);
    let f = c.intermediate_size;
    time("gate/up + act", &mut || {
        let _ = m.gate_proj.forward(&x).silu() * m.up_proj.forward(&x);
    });
    time("gate/up fused + act", &mut || {
        let gu = x.linear(&gu_w, None::<Tensor>);
        let mut g = gu.narrow(-1, 0, f);
        let _ = g.silu_();
        let _ = g.g_mul_(&gu.narrow(-1, f, f));
    });
    let nw = &layer.input_layernorm.weight;
    time("rms_norm op", &mut || {
        let _ = x.rms_norm([d], Some(nw), 1e-6);
    });
    let all = h + 2 * kv;
    let qkv = Tensor::randn([batch, 1, all, hd], (Kind::Float, Device::Cpu));
    let cos = Tensor::randn([batch, 1, all, hd], (Kind::Float, Device::Cpu));
    time("rope all heads", &mut || {
        let sw = qkv
            .view([batch, 1, all, 2, hd / 2])
            .flip([3])
            .view([batch, 1, all, hd]);
        let _ = (&qkv * &cos).addcmul_(&sw, &cos);
    });
    let c1 = Tensor::randn([batch, 1, 1, hd], (Kind::Float, Device::Cpu));
    time("rope q and k apart", &mut || {
        for x in [qkv.narrow(2, 0, h), qkv.narrow(2, h, kv)] {
            let x1 = x.narrow(3, 0, hd / 2);
            let x2 = x.narrow(3, hd / 2, hd / 2);
            let r = Tensor::cat(&[&x2.neg(), &x1], -1);
            let _ = &x * &c1 + r * &c1;
        }
    });
    time("empty op (view)", &mut || {
        let _ = x.view([batch, d]);
    });
    time("small add", &mut || {
        let _ = &x + &x;
    });
}
