//! Multi-tensor operations: one libtorch call for a whole list of tensors. On CUDA each is a
//! handful of kernel launches instead of one or more per tensor (AdamW over a 3B model's ~250
//! tensors was ~3,000 launches); on the CPU the fused AdamW is one vectorised pass per tensor
//! instead of eight.
use crate::{check, ffi, ExtError, Result};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

fn ptrs(ts: &[Tensor]) -> Vec<*mut C_tensor> {
    ts.iter().map(|t| t.as_ptr() as *mut C_tensor).collect()
}

fn same_len(what: &str, n: usize, others: &[(&str, usize)]) -> Result<()> {
    for (name, len) in others {
        if *len != n {
            return Err(ExtError::Invalid(format!("{what}: {n} parameters but {len} {name}")));
        }
    }
    Ok(())
}

/// AdamW's hyper-parameters for one update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One AdamW update of every parameter, with torch.optim.AdamW(fused=True)'s kernel:
/// decoupled weight decay, bias-corrected moments, all in place. `steps[i]` is a one-element
/// f32 tensor holding parameter i's step count including this update (the caller advances it);
/// gradients must have their parameter's dtype, shape and device.
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    h: AdamWHyper,
) -> Result<()> {
    let n = params.len();
    same_len(
        "fused AdamW",
        n,
        &[
            ("gradients", grads.len()),
            ("first moments", exp_avgs.len()),
            ("second moments", exp_avg_sqs.len()),
            ("step counts", steps.len()),
        ],
    )?;
    if n == 0 {
        return Ok(());
    }
    // libtorch's CPU kernel does not check these itself: a moment of another size would be
    // read and written out of bounds.
    for i in 0..n {
        let p = &params[i];
        for (what, t) in [("gradient", &grads[i]), ("first moment", &exp_avgs[i]), ("second moment", &exp_avg_sqs[i])] {
            if p.size() != t.size() || p.kind() != t.kind() || p.device() != t.device() || !t.is_contiguous() {
                return Err(ExtError::Invalid(format!(
                    "fused AdamW: parameter {i} is {:?} {:?} on {:?} but its {what} is {:?} {:?} on {:?}{}",
                    p.kind(),
                    p.size(),
                    p.device(),
                    t.kind(),
                    t.size(),
                    t.device(),
                    if t.is_contiguous() { "" } else { ", not contiguous" }
                )));
            }
        }
        if !p.is_contiguous() {
            return Err(ExtError::Invalid(format!("fused AdamW: parameter {i} is not contiguous")));
        }
        let s = &steps[i];
        if s.numel() != 1 || s.kind() != Kind::Float {
            return Err(ExtError::Invalid(format!("fused AdamW: step count {i} must be one f32 element")));
        }
    }
    let (p, g, m, v, s) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs), ptrs(steps));
    check(unsafe {
        ffi::sp_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
        )
    })
}

/// Each tensor's L2 norm accumulated in f32, as one f32 tensor [n] on their device.
pub fn norms_f32(ts: &[Tensor]) -> Result<Tensor> {
    if ts.is_empty() {
        return Ok(Tensor::zeros([0], (Kind::Float, tch::Device::Cpu)));
    }
    let p = ptrs(ts);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    check(unsafe { ffi::sp_foreach_norm_f32(p.as_ptr(), p.len(), &mut out) })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// ts[i] *= scale, a one-element tensor (on the tensors' device or the CPU).
pub fn mul_(ts: &[Tensor], scale: &Tensor) -> Result<()> {
    if ts.is_empty() {
        return Ok(());
    }
    let p = ptrs(ts);
    check(unsafe { ffi::sp_foreach_mul_tensor_(p.as_ptr(), p.len(), scale.as_ptr() as *mut C_tensor) })
}

/// Zeroes every tensor.
pub fn zero_(ts: &[Tensor]) -> Result<()> {
    if ts.is_empty() {
        return Ok(());
    }
    let p = ptrs(ts);
    check(unsafe { ffi::sp_foreach_zero_(p.as_ptr(), p.len()) })
}

/// dst[i].copy_(src[i]), converting dtypes.
pub fn copy_(dst: &[Tensor], src: &[Tensor]) -> Result<()> {
    same_len("foreach copy", dst.len(), &[("sources", src.len())])?;
    if dst.is_empty() {
        return Ok(());
    }
    let (d, s) = (ptrs(dst), ptrs(src));
    check(unsafe { ffi::sp_foreach_copy_(d.as_ptr(), s.as_ptr(), d.len()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch.optim.AdamW's update written out in f64.
    fn textbook(p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], t: i32, h: AdamWHyper) {
        for i in 0..p.len() {
            p[i] *= 1.0 - h.lr * h.weight_decay;
            m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g[i];
            v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g[i] * g[i];
            let denom = (v[i] / (1.0 - h.beta2.powi(t))).sqrt() + h.eps;
            p[i] -= h.lr / (1.0 - h.beta1.powi(t)) * m[i] / denom;
        }
    }

    fn floats(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    #[test]
    fn fused_adamw_is_adamw_over_many_tensors() {
        let h = AdamWHyper { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let shapes: [&[i64]; 3] = [&[5], &[3, 4], &[2, 2, 3]];
        let params: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, tch::Device::Cpu))).collect();
        let mut want: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> =
            params.iter().map(|p| (floats(p), vec![0.0; p.numel()], vec![0.0; p.numel()])).collect();
        let m: Vec<Tensor> = params.iter().map(|p| p.zeros_like()).collect();
        let v: Vec<Tensor> = params.iter().map(|p| p.zeros_like()).collect();
        let steps: Vec<Tensor> = params.iter().map(|_| Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))).collect();
        for t in 1..=6 {
            let grads: Vec<Tensor> = params.iter().map(|p| p.randn_like()).collect();
            for s in &steps {
                let _ = s.shallow_clone().fill_(t as f64);
            }
            fused_adamw(&params, &grads, &m, &v, &steps, h).unwrap();
            for ((p, mm, vv), g) in want.iter_mut().zip(&grads) {
                textbook(p, mm, vv, &floats(g), t, h);
            }
        }
        for (p, (w, wm, _)) in params.iter().zip(&want) {
            for (a, b) in floats(p).iter().zip(w) {
                assert!((a - b).abs() < 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
            }
            let _ = wm;
        }
        for (mm, (_, wm, _)) in m.iter().zip(&want) {
            for (a, b) in floats(mm).iter().zip(wm) {
                assert!((a - b).abs() < 1e-6 * (1.0 + b.abs()), "moment {a} vs {b}");
            }
        }
    }

    #[test]
    fn mismatched_lists_and_dtypes_are_refused_before_libtorch() {
        let h = AdamWHyper { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let p = vec![Tensor::ones([3], (Kind::Float, tch::Device::Cpu))];
        let before = floats(&p[0]);
        let g16 = vec![Tensor::ones([3], (Kind::BFloat16, tch::Device::Cpu))];
        let z = vec![p[0].zeros_like()];
        let s = vec![Tensor::ones([1], (Kind::Float, tch::Device::Cpu))];
        let e = fused_adamw(&p, &g16, &z, &z, &s, h).unwrap_err().to_string();
        assert!(e.contains("gradient"), "{e}");
        let e = fused_adamw(&p, &g16[..0], &z, &z, &s, h).unwrap_err().to_string();
        assert!(e.contains("0 gradients"), "{e}");
        // A moment of another size (libtorch's CPU kernel would run past its end).
        let bad = vec![Tensor::ones([4], (Kind::Float, tch::Device::Cpu))];
        let e = fused_adamw(&p, &[p[0].ones_like()], &bad, &z, &s, h).unwrap_err().to_string();
        assert!(e.contains("first moment"), "{e}");
        let e = fused_adamw(&p, &[p[0].ones_like()], &z, &z, &[Tensor::ones([2], (Kind::Float, tch::Device::Cpu))], h)
            .unwrap_err()
            .to_string();
        assert!(e.contains("step count"), "{e}");
        assert_eq!(floats(&p[0]), before, "nothing was updated");
    }

    #[test]
    fn norms_scale_zero_and_copy() {
        let a = Tensor::from_slice(&[3.0f32, 4.0]);
        let b = Tensor::from_slice(&[1.0f32, 2.0, 2.0]).to_kind(Kind::BFloat16);
        let n = norms_f32(&[a.shallow_clone(), b.shallow_clone()]).unwrap();
        assert_eq!(n.kind(), Kind::Float);
        assert_eq!(floats(&n), vec![5.0, 3.0]);
        mul_(&[a.shallow_clone(), b.shallow_clone()], &Tensor::from(0.5f32)).unwrap();
        assert_eq!(floats(&a), vec![1.5, 2.0]);
        assert_eq!(floats(&b), vec![0.5, 1.0, 1.0]);
        let dst = vec![Tensor::zeros([2], (Kind::BFloat16, tch::Device::Cpu))];
        copy_(&dst, &[a.shallow_clone()]).unwrap();
        assert_eq!(floats(&dst[0]), vec![1.5, 2.0]);
        zero_(&[a.shallow_clone(), b.shallow_clone()]).unwrap();
        assert_eq!(floats(&a), vec![0.0, 0.0]);
        assert!(copy_(&dst, &[]).is_err());
    }
}
