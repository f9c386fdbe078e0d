fn main() -> std::process::ExitCode {
    match lockstep::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One readable line, not a backtrace: these are the user's errors, not ours.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
