//! Freezing schedules (UME): phases keyed by global step, each naming the trainable
//! parameters by glob patterns (`*` matches any run of characters, dots included; `?`
//! one character). The phase is a pure function of the step, so every rank and every
//! restart agrees. Frozen parameters get no gradient (`requires_grad` off), hence no
//! update, no optimizer state and no communication.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// One phase: from `from_step` on, exactly the parameters matching `trainable` train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezePhase {
    /// First global step of the phase.
    pub from_step: u64,
    /// Glob patterns of the trainable parameters' names.
    pub trainable: Vec<String>,
    /// A learning-rate schedule of the phase's own, from `from_step` (re-warmed); without
    /// it the schedule in force goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_schedule: Option<crate::config::PhaseSchedule>,
}

/// Whether `name` matches `pattern` (`*`: any run, `?`: one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative wildcard matching with one backtrack point (the last `*`).
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A validated schedule over a model's parameters.
#[derive(Debug)]
pub struct FreezeSchedule {
    phases: Vec<FreezePhase>,
    /// The parameters the schedule governs (buffers are never made trainable).
    params: BTreeMap<String, Tensor>,
}

impl FreezeSchedule {
    /// A schedule over `params` (the model's trainable parameters). Phases must start at
    /// increasing steps and every pattern must match some parameter; the error names the
    /// pattern. An empty list trains everything always.
    pub fn new(phases: &[FreezePhase], params: &BTreeMap<String, Tensor>) -> Result<Self, String> {
        for w in phases.windows(2) {
            if w[1].from_step <= w[0].from_step {
                return Err(format!(
                    "upcycle_conf.freeze: phases must start at increasing steps ({} then {})",
                    w[0].from_step, w[1].from_step
                ));
            }
        }
        for phase in phases {
            if let Some(bad) = phase
                .trainable
                .iter()
                .find(|p| !params.keys().any(|n| glob_match(p, n)))
            {
                return Err(format!(
                    "upcycle_conf.freeze: pattern {bad:?} (phase from step {}) matches no parameter",
                    phase.from_step
                ));
            }
        }
        Ok(Self {
            phases: phases.to_vec(),
            params: params
                .iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect(),
        })
    }

    /// Index of the phase at `step` (`None` before the first or without phases).
    pub fn phase_at(&self, step: u64) -> Option<usize> {
        self.phases.iter().rposition(|p| p.from_step <= step)
    }

    /// Sets `requires_grad` of every parameter for `step`; returns the trainable count.
    pub fn apply(&self, step: u64) -> usize {
        let phase = self.phase_at(step).map(|i| &self.phases[i]);
        let mut trainable = 0;
        for (name, p) in &self.params {
            let on = phase.is_none_or(|ph| ph.trainable.iter().any(|g| glob_match(g, name)));
            let _ = p.set_requires_grad(on);
            trainable += usize::from(on);
        }
        trainable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(
            "*.experts.*",
            "encoder.encoders.0.feed_forward.experts.w_1"
        ));
        assert!(glob_match(
            "*.router.*",
            "decoder.left_decoder.decoders.0.feed_forward.router.weight"
        ));
        assert!(!glob_match(
            "*.experts.*",
            "encoder.encoders.0.feed_forward.w_1.weight"
        ));
        assert!(glob_match("*", "anything.at.all"));
        assert!(glob_match(
            "encoder.encoders.?.norm_ff.*",
            "encoder.encoders.3.norm_ff.bias"
        ));
        assert!(!glob_match(
            "encoder.encoders.?.norm_ff.*",
            "encoder.encoders.13.norm_ff.bias"
        ));
        assert!(glob_match("a*b*c", "axxbyyc") && !glob_match("a*b*c", "axxbyy"));
    }

    #[test]
    fn phases_follow_the_step_and_bad_patterns_are_named() {
        let params: BTreeMap<String, Tensor> =
            ["l.experts.w_1", "l.router.weight", "l.norm.weight"]
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        Tensor::zeros([2], tch::kind::FLOAT_CPU).set_requires_grad(true),
                    )
                })
                .collect();
        let phases = vec![
            FreezePhase {
                from_step: 0,
                trainable: vec!["*.experts.*".into(), "*.router.*".into()],
                lr_schedule: None,
            },
            FreezePhase {
                from_step: 10,
                trainable: vec!["*".into()],
                lr_schedule: None,
            },
        ];
        let s = FreezeSchedule::new(&phases, &params).unwrap();
        assert_eq!(s.apply(0), 2);
        assert!(!params["l.norm.weight"].requires_grad());
        assert_eq!(s.apply(9), 2);
        assert_eq!(s.apply(10), 3);
        assert!(params["l.norm.weight"].requires_grad());
        let bad = vec![FreezePhase {
            from_step: 0,
            trainable: vec!["*.expert.*".into()],
            lr_schedule: None,
        }];
        let e = FreezeSchedule::new(&bad, &params).unwrap_err();
        assert!(e.contains("*.expert.*"), "{e}");
    }
}
