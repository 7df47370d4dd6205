"""Ray actors over ``wise`` (editor, evaluator) and the vLLM serving replica: built in the orchestration and
serving stages. Kept empty here so that the package layout is fixed from the start."""
