"""A run over many images: which jobs run (plan), streaming them through a pipeline
(runner), the report, several processes (shard: --shard and the launchers' ranks; ray: --ray).

No typer, no rich: the batch takes its display and its stop flag as arguments and returns
what happened; the CLI turns that into lines and an exit code.
"""
