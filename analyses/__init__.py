"""The binding papers' experiments as composable functions over hook names and TokenLayout position sets."""
