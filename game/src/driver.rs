//! A small in-process loop: play N units with a [`Player`], take one step with a [`Trainer`],
//! copy the new weights to the player. The distributed runtime does the same over gRPC.
use crate::error::Result;
use crate::play::{unit_seed, Player, Unit};
use crate::trainer::{StepStats, Trainer};

/// The units of a step: tasks round-robin, GRPO prompts in order from `prompts`.
pub fn units_for_step(trainer_cfg: &crate::Config, step: u64, prompts: &[String]) -> Vec<Unit> {
    let g = &trainer_cfg.game;
    (0..g.queries_per_step as u64)
        .map(|i| Unit {
            unit_id: selfplay_proto::unit::unit_id(step, i as u32),
            step,
            seed: unit_seed(trainer_cfg.run.seed, step, i as u32),
            task: if g.tasks.is_empty() {
                String::new()
            } else {
                g.tasks[((step * g.queries_per_step as u64 + i) as usize) % g.tasks.len()].clone()
            },
            template: g.template.clone(),
            prompt: if prompts.is_empty() {
                String::new()
            } else {
                prompts[((step * g.queries_per_step as u64 + i) as usize) % prompts.len()].clone()
            },
        })
        .collect()
}

/// Runs `steps` synchronous (on-policy) steps in process.
pub fn run_local(
    player: &mut Player,
    trainer: &mut Trainer,
    steps: u64,
    prompts: &[String],
    mut on_step: impl FnMut(&StepStats),
) -> Result<Vec<StepStats>> {
    let mut all = vec![];
    for _ in 0..steps {
        let step = trainer.step;
        let mut groups = vec![];
        for unit in units_for_step(&trainer.cfg, step, prompts) {
            let (g, _) = player.play(&unit, step, "local")?;
            groups.push(g);
        }
        let stats = trainer.train_step(&groups)?;
        player.policy.model.copy_weights_from(&trainer.policy.model)?;
        on_step(&stats);
        all.push(stats);
    }
    Ok(all)
}
