//! What docs/method.md says about the KL options' gradients, checked exactly on one token
//! position (a categorical over a small vocabulary, expectations summed in closed form):
//! - `k3` differentiated as a loss on tokens drawn from pi has the expected gradient of the
//!   forward KL(pi_ref || pi), not of the reverse KL(pi || pi_ref) (they agree near pi_ref);
//! - `paper`'s literal log-ratio has zero expected gradient on-policy.
use tch::{Kind, Tensor};

/// E_{y ~ pi}[grad f(y)] with the sampling weights pi(y) held fixed (the samples' law is not
/// differentiated, exactly as a loss on sampled tokens is not).
fn expected_pathwise_grad(theta: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let lp = theta.log_softmax(0, Kind::Double);
    let p = lp.exp().detach();
    let loss = (&p * f(&lp)).sum(Kind::Double);
    Tensor::run_backward(&[loss], &[theta], false, false).remove(0)
}

fn grad_of(theta: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let lp = theta.log_softmax(0, Kind::Double);
    Tensor::run_backward(&[f(&lp)], &[theta], false, false).remove(0)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn k3_follows_the_forward_kl_and_the_literal_log_ratio_has_no_expected_gradient() {
    tch::manual_seed(3);
    for _ in 0..5 {
        let theta = Tensor::randn([7], (Kind::Double, tch::Device::Cpu)).set_requires_grad(true);
        let lref = Tensor::randn([7], (Kind::Double, tch::Device::Cpu)).log_softmax(0, Kind::Double);
        let k3 = expected_pathwise_grad(&theta, |lp| {
            let d = &lref - lp;
            d.exp() - &d - 1.0
        });
        let forward = grad_of(&theta, |lp| (lref.exp() * (&lref - lp)).sum(Kind::Double));
        let reverse = grad_of(&theta, |lp| (lp.exp() * (lp - &lref)).sum(Kind::Double));
        let paper = expected_pathwise_grad(&theta, |lp| lp - &lref);
        assert!(max_diff(&k3, &forward) < 1e-12, "k3 {k3:?} vs forward KL {forward:?}");
        assert!(max_diff(&k3, &reverse) > 1e-3, "k3 should differ from the reverse KL away from pi_ref");
        assert!(paper.abs().max().double_value(&[]) < 1e-12, "paper {paper:?}");
    }
}
