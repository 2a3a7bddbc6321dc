//! AdamW whose state cairn owns: the first and second moments and the step count of every
//! trainable variable, by name, so that a training stage can save them next to the weights
//! and a resumed run continues exactly where it stopped (libtorch's optimiser keeps its state
//! out of reach of the Rust bindings). The update is libtorch's AdamW, operation for
//! operation: decoupled weight decay, then the moments, then the bias-corrected step.
//!
//! ```
//! use cairn::train::adamw::AdamW;
//! use tch::{nn, nn::Module, Device, Kind, Tensor};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let layer = nn::linear(vs.root() / "layer", 2, 1, Default::default());
//! let mut opt = AdamW::new(&vs, 0.1, 0.0);
//! let x = Tensor::ones([4, 2], (Kind::Float, Device::Cpu));
//! let before = layer.forward(&x).square().mean(Kind::Float).double_value(&[]);
//! for _ in 0..20 {
//!     opt.zero_grad();
//!     layer.forward(&x).square().mean(Kind::Float).backward();
//!     opt.step();
//! }
//! let after = layer.forward(&x).square().mean(Kind::Float).double_value(&[]);
//! assert!(after < before);
//! ```

use std::path::Path;

use tch::{Kind, Tensor, nn};

use crate::model::ModelError;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// One trainable variable and its optimiser state.
struct Slot {
    name: String,
    var: Tensor,
    /// Running mean of the gradient.
    m: Tensor,
    /// Running mean of the squared gradient.
    v: Tensor,
    /// Steps this variable has taken (it skips steps in which it got no gradient).
    steps: i64,
}

/// The AdamW optimiser over a variable store's trainable variables.
pub struct AdamW {
    slots: Vec<Slot>,
    lr: f64,
    weight_decay: f64,
}

impl AdamW {
    /// An optimiser over `vs`'s trainable variables at learning rate `lr`.
    pub fn new(vs: &nn::VarStore, lr: f64, weight_decay: f64) -> AdamW {
        let mut opt = AdamW {
            slots: Vec::new(),
            lr,
            weight_decay,
        };
        opt.track(vs);
        opt
    }

    /// Starts tracking trainable variables added to `vs` since (a value head added later).
    pub fn track(&mut self, vs: &nn::VarStore) {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in vars {
            if self.slots.iter().any(|s| s.name == name) {
                continue;
            }
            let _g = tch::no_grad_guard();
            self.slots.push(Slot {
                m: var.zeros_like(),
                v: var.zeros_like(),
                name,
                var,
                steps: 0,
            });
        }
    }

    /// Sets the learning rate of the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Sets the decoupled weight decay of the next steps.
    pub fn set_weight_decay(&mut self, weight_decay: f64) {
        self.weight_decay = weight_decay;
    }

    /// The tracked variables.
    pub fn trainable_variables(&self) -> Vec<Tensor> {
        self.slots.iter().map(|s| s.var.shallow_clone()).collect()
    }

    /// Zeroes every gradient. (libtorch drops them instead, so a variable outside the loss skips
    /// the step there; the bindings cannot drop a gradient, so here such a variable steps with
    /// a zero gradient and moves only by weight decay or its earlier moments.)
    pub fn zero_grad(&mut self) {
        for s in &self.slots {
            let mut g = s.var.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Scales the gradients so that their global L2 norm is at most `max`.
    pub fn clip_grad_norm(&mut self, max: f64) {
        let _g = tch::no_grad_guard();
        let norms: Vec<Tensor> = self
            .slots
            .iter()
            .map(|s| s.var.grad())
            .filter(|g| g.defined())
            .map(|g| g.norm())
            .collect();
        if norms.is_empty() {
            return;
        }
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        let coef = max / (total + 1e-6);
        if coef < 1.0 {
            for s in &self.slots {
                let mut g = s.var.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(coef);
                }
            }
        }
    }

    /// One AdamW step of every variable that has a gradient.
    pub fn step(&mut self) {
        let _g = tch::no_grad_guard();
        for s in &mut self.slots {
            let grad = s.var.grad();
            if !grad.defined() {
                continue;
            }
            s.steps += 1;
            if self.weight_decay != 0.0 {
                let _ = s.var.g_mul_scalar_(1.0 - self.lr * self.weight_decay);
            }
            let _ = s.m.g_mul_scalar_(BETA1);
            let _ = s.m.g_add_(&(&grad * (1.0 - BETA1)));
            let _ = s.v.g_mul_scalar_(BETA2);
            let _ = s.v.addcmul_(&grad, &(&grad * (1.0 - BETA2)));
            let bias1 = 1.0 - BETA1.powi(s.steps as i32);
            let bias2 = 1.0 - BETA2.powi(s.steps as i32);
            let denom = (s.v.sqrt() / bias2.sqrt()).g_add_scalar_(EPS);
            let step = &s.m / &denom * (-self.lr / bias1);
            let _ = s.var.g_add_(&step);
        }
    }

    /// Writes the moments and step counts to `path` (safetensors, by variable name).
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(self.slots.len() * 3);
        for s in &self.slots {
            named.push((format!("{}.m", s.name), s.m.shallow_clone()));
            named.push((format!("{}.v", s.name), s.v.shallow_clone()));
            named.push((
                format!("{}.steps", s.name),
                Tensor::from_slice(&[s.steps]).to_kind(Kind::Int64),
            ));
        }
        Tensor::write_safetensors(&named, path).map_err(ModelError::Torch)
    }

    /// Restores the moments and step counts [`save`](AdamW::save) wrote. The optimiser then
    /// tracks exactly the variables the file names (one added to the store after the save,
    /// such as a later value head, was not this optimiser's); a name the store lacks, or a
    /// shape that differs, is an error.
    pub fn load(&mut self, path: &Path) -> Result<(), ModelError> {
        let bad = |message: String| ModelError::Weights {
            path: path.to_path_buf(),
            message,
        };
        let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| bad(e.to_string()))?
            .into_iter()
            .collect();
        for name in tensors.keys() {
            let var = name
                .strip_suffix(".m")
                .or_else(|| name.strip_suffix(".v"))
                .or_else(|| name.strip_suffix(".steps"))
                .unwrap_or(name);
            if !self.slots.iter().any(|s| s.name == var) {
                return Err(bad(format!(
                    "optimiser state for `{var}`, which the model does not have"
                )));
            }
        }
        self.slots
            .retain(|s| tensors.contains_key(&format!("{}.m", s.name)));
        let _g = tch::no_grad_guard();
        for s in &mut self.slots {
            let get = |suffix: &str| {
                tensors
                    .get(&format!("{}.{suffix}", s.name))
                    .ok_or_else(|| bad(format!("no `{suffix}` state for `{}`", s.name)))
            };
            let (m, v, steps) = (get("m")?, get("v")?, get("steps")?);
            if m.size() != s.m.size() || v.size() != s.v.size() {
                return Err(bad(format!(
                    "optimiser state for `{}` has shape {:?}, the variable {:?}",
                    s.name,
                    m.size(),
                    s.m.size()
                )));
            }
            s.m.copy_(m);
            s.v.copy_(v);
            s.steps = steps.int64_value(&[0]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tch::nn::{Module, OptimizerConfig};
    use tch::{Device, Kind, Tensor, nn};

    use super::AdamW;

    fn model(seed: i64) -> (nn::VarStore, nn::Linear) {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let layer = nn::linear(vs.root() / "layer", 4, 3, Default::default());
        (vs, layer)
    }

    fn loss(layer: &nn::Linear, step: i64) -> Tensor {
        let x = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]) / (3.0 + step as f64);
        (layer.forward(&x) - 0.5).square().mean(Kind::Float)
    }

    #[test]
    fn matches_libtorch_adamw_step_for_step() {
        let (vs_a, a) = model(3);
        let (mut vs_b, b) = model(3);
        // The same starting weights whatever other tests draw from libtorch's global
        // generator meanwhile (tests share the process, and `manual_seed` is global).
        vs_b.copy(&vs_a).expect("copy the starting weights");
        let mut ours = AdamW::new(&vs_a, 0.01, 0.1);
        let mut theirs = nn::AdamW {
            wd: 0.1,
            ..nn::AdamW::default()
        }
        .build(&vs_b, 0.01)
        .expect("libtorch optimiser");
        for step in 0..25 {
            ours.zero_grad();
            loss(&a, step).backward();
            ours.step();
            theirs.zero_grad();
            loss(&b, step).backward();
            theirs.step();
        }
        let (va, vb) = (vs_a.variables(), vs_b.variables());
        for (name, t) in &va {
            let diff = (t - &vb[name]).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name}: {diff}");
        }
    }

    #[test]
    fn a_saved_state_continues_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("opt.safetensors");
        let weights = dir.path().join("w.safetensors");
        let (vs, layer) = model(5);
        let mut opt = AdamW::new(&vs, 0.02, 0.0);
        let train = |opt: &mut AdamW, layer: &nn::Linear, steps: std::ops::Range<i64>| {
            for step in steps {
                opt.zero_grad();
                loss(layer, step).backward();
                opt.clip_grad_norm(0.5);
                opt.step();
            }
        };
        train(&mut opt, &layer, 0..4);
        opt.save(&path).expect("save");
        vs.save(&weights).expect("save weights");
        train(&mut opt, &layer, 4..9);
        // A fresh model and optimiser, restored, take the same five steps.
        let (mut vs2, layer2) = model(99);
        vs2.load(&weights).expect("load weights");
        let mut opt2 = AdamW::new(&vs2, 0.02, 0.0);
        opt2.load(&path).expect("load");
        train(&mut opt2, &layer2, 4..9);
        for (name, t) in &vs.variables() {
            assert!(t.equal(&vs2.variables()[name]), "{name} differs");
        }
        // A file for other variables is refused.
        let (vs3, _) = {
            let vs = nn::VarStore::new(Device::Cpu);
            let l = nn::linear(vs.root() / "other", 4, 3, Default::default());
            (vs, l)
        };
        assert!(AdamW::new(&vs3, 0.02, 0.0).load(&path).is_err());
    }
}
