//! The within-group ranking accuracy of the implicit PRM, by hand (the Python reference of
//! learner/tests/algo_golden.rs checks it on random batches).
use prime_algo::implicit_prm::{group_ranking_accuracy, ranking_accuracy};
use tch::{Kind, Tensor};

#[test]
fn ranking_accuracy_by_hand() {
    // Group 1: correct {3, 2} against wrong {1, 2}: 3>1, 3>2, 2>1 and a tie: 3.5 of 4.
    // Group 2: all correct, left out. Group 3: correct 0 against wrong {1, 0, 0}: a miss
    // and two ties, 1 of 3.
    let sums = [
        3.0f32, 1.0, 2.0, 2.0, 5.0, 1.0, 2.0, 3.0, 0.0, 1.0, 0.0, 0.0,
    ];
    let scores = [
        1.0f32, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0,
    ];
    let mask = Tensor::ones([12, 2], (Kind::Bool, tch::Device::Cpu));
    // Token rewards whose row sums are `sums`: half on each of two tokens.
    let rewards = (Tensor::from_slice(&sums) / 2.0)
        .unsqueeze(1)
        .repeat([1, 2]);
    let got = ranking_accuracy(&rewards, &mask, &Tensor::from_slice(&scores), 4).unwrap();
    assert!((got - (3.5 / 4.0 + 1.0 / 3.0) / 2.0).abs() < 1e-12, "{got}");
    // Groups of 2: (3,1) hit, (2,2) tie, (5,1) and (2,3) left out, (0,1) miss, (0,0) out.
    let got = ranking_accuracy(&rewards, &mask, &Tensor::from_slice(&scores), 2).unwrap();
    assert!((got - (1.0 + 0.5 + 0.0) / 3.0).abs() < 1e-12, "{got}");
    // Scores 1, 0.5, 0, 0 with sums 1, 2, 3, 3: all five ordered pairs are misses.
    let fractional = group_ranking_accuracy(&[1.0, 2.0, 3.0, 3.0], &[1.0, 0.5, 0.0, 0.0], 4);
    assert_eq!(fractional, Some(0.0));
    // Masked tokens do not count; no group with two scores gives None.
    let half = Tensor::from_slice2(&[[true, false], [true, true]]);
    let r = Tensor::from_slice2(&[[1.0f32, 9.0], [1.0, 0.5]]);
    let s = Tensor::from_slice(&[1.0f32, 0.0]);
    assert_eq!(ranking_accuracy(&r, &half, &s, 2), Some(0.0));
    let same = Tensor::from_slice(&[1.0f32, 1.0]);
    assert_eq!(ranking_accuracy(&r, &half, &same, 2), None);
}
