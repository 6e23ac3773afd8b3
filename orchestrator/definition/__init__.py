"""What a workflow is: specs, the DAG, files, inputs, templates, conditions and their sandbox."""
