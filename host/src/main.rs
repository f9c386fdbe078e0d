fn main() -> anyhow::Result<()> {
    lockstep::cli::main()
}
