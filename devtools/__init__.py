"""Developer tooling: the embedded stack, the demo, progress display and child processes.
Only the roof's `tally dev` / `tally demo` commands reach it; the product never imports it."""
