//! Our AdamW and learning-rate schedule against `torch.optim.AdamW` on the same parameters and
//! gradients.
use std::collections::BTreeMap;

use prime_learner::{AdamW, AdamWConfig};
use prime_tests::*;
use serde_json::Value;
use tch::{Kind, Tensor};

const STEPS: usize = 5;

#[test]
fn adamw_matches_torch_and_resumes_exactly() {
    init_threads();
    let config = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let lr = [1e-2, 5e-3, 2e-3, 1e-3, 5e-4];
    let init: Vec<f32> = (0..12).map(|i| ((i as f32) * 0.37).sin()).collect();
    // Gradient of step s: g = cos(0.5 i + s) * (s + 1), the same formula on both sides.
    let grad = |s: usize| -> Vec<f32> {
        (0..12)
            .map(|i| ((0.5 * i as f32) + s as f32).cos() * (s as f32 + 1.0))
            .collect()
    };
    let script = format!(
        "import json,torch,math\n\
         torch.set_num_threads(1)\n\
         p=torch.nn.Parameter(torch.tensor({init:?},dtype=torch.float32).view(3,4))\n\
         opt=torch.optim.AdamW([p],lr=1.0,betas=(0.9,0.95),eps=1e-8,weight_decay=0.1)\n\
         for s,lr in enumerate({lr:?}):\n\
         \x20   opt.param_groups[0]['lr']=lr\n\
         \x20   p.grad=torch.tensor([math.cos(0.5*i+s)*(s+1) for i in range(12)],dtype=torch.float32).view(3,4)\n\
         \x20   opt.step()\n\
         print(json.dumps(p.detach().flatten().tolist()))\n"
    );
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference = f32s(&reference);

    let run = |steps: std::ops::Range<usize>, param: &Tensor, optimizer: &mut AdamW| {
        for s in steps {
            optimizer.zero_grad();
            // d/dp sum(p * g) = g: puts exactly g into p.grad.
            let g = Tensor::from_slice(&grad(s)).view([3, 4]);
            (param * g).sum(Kind::Float).backward();
            optimizer.step(lr[s]);
        }
    };
    let param = Tensor::from_slice(&init)
        .view([3, 4])
        .set_requires_grad(true);
    let mut optimizer = AdamW::new(vec![("w".into(), param.shallow_clone())], config);
    run(0..STEPS, &param, &mut optimizer);
    let ours = Vec::<f32>::try_from(param.flatten(0, -1)).unwrap();
    assert!(
        max_abs_diff(&ours, &reference) < 1e-6,
        "{ours:?} vs {reference:?}"
    );

    // Stopping after two steps and resuming from the saved state gives the same parameters.
    let param2 = Tensor::from_slice(&init)
        .view([3, 4])
        .set_requires_grad(true);
    let mut first = AdamW::new(vec![("w".into(), param2.shallow_clone())], config);
    run(0..2, &param2, &mut first);
    let (state, step) = first.state();
    let saved: BTreeMap<String, Tensor> =
        state.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
    let resumed_param = param2.detach().copy().set_requires_grad(true);
    let mut resumed = AdamW::new(vec![("w".into(), resumed_param.shallow_clone())], config);
    resumed.load_state(&saved, step).unwrap();
    run(2..STEPS, &resumed_param, &mut resumed);
    assert!(resumed_param.equal(&param), "resume changed the trajectory");
}
