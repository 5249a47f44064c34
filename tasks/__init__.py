"""Units of pipeline work: plain functions (what the tests call) and the Prefect tasks wrapping them."""
