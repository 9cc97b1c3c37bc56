//! `--threads`: the size of the thread pool the CPU backend and tokenization run on. Only the
//! commands that compute take it (not the client commands, which talk to a coordinator), after
//! the command (`smelt train --threads 4`) or before it (`smelt --threads 4 train`, as `smelt up`
//! starts its workers).

#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct Threads {
    /// Threads for the CPU backend and tokenization (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}
