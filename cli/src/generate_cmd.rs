//! `selfplay generate`: one chat answer, streamed to the terminal or printed as JSON.
use crate::ModelArgs;
use anyhow::Result;
use selfplay_policy::{ChatMessage, GenRequest, SamplingConfig};
use std::io::Write;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user's message.
    #[arg(long)]
    pub prompt: String,
    /// Optional system message.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: i64,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print prompt ids, completion ids, text and log-probs as JSON instead of streaming.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let policy = args.model.load()?;
    let mut messages = vec![];
    if let Some(s) = &args.system {
        messages.push(ChatMessage::system(s.clone()));
    }
    messages.push(ChatMessage::user(args.prompt.clone()));
    let prompt = policy.tokenizer.encode_chat(&messages, true)?;
    let cfg = SamplingConfig {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
        stop: args.stop.clone(),
        max_batch: 0,
    };
    let mut ids = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout().lock();
    let stream = !args.json;
    let t0 = std::time::Instant::now();
    let reqs = GenRequest::from_prompts(&[prompt], cfg.seed);
    let on_token = |_: usize, id: i64| {
        if !stream {
            return;
        }
        ids.push(id);
        // Print only complete characters: wait while the tail is a partial UTF-8 sequence.
        if let Ok(text) = policy.tokenizer.decode(&ids, true) {
            if !text.ends_with('\u{FFFD}') && text.len() > printed && text.is_char_boundary(printed) {
                let _ = write!(stdout, "{}", &text[printed..]);
                let _ = stdout.flush();
                printed = text.len();
            }
        }
    };
    let (out, _) = policy.generator().on_token(on_token).run(&reqs, &cfg)?;
    let c = &out[0];
    if args.json {
        println!("{}", serde_json::to_string_pretty(c)?);
    } else {
        println!();
    }
    tracing::info!(
        tokens = c.completion_ids.len(),
        secs = t0.elapsed().as_secs_f64(),
        finish = ?c.finish_reason,
        "done"
    );
    Ok(())
}
