# Tokenizers, the demo's generated data, and the prepare stage.


rule tokenizer:
    output:
        directory(f"{R}/tokenizers/{{role}}"),
    log:
        f"{R}/logs/tokenizer-{{role}}.log",
    benchmark:
        f"{R}/benchmarks/tokenizer-{{role}}.tsv"
    wildcard_constraints:
        role="teacher|student",
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    params:
        flags=lambda w: stage_flags(TokenizerSettings, {"role": w.role}, source=tokenizer_source(w.role)),
        # a changed builtin chat template must rebuild the tokenizer (params changes rerun a rule)
        template_digest=lambda w: template_digest(w.role),
    shell:
        "prefkd tokenizer --out {output} {params.flags} > {log} 2>&1"


rule demo_data:
    output:
        f"{R}/raw/demo_pairs.jsonl",
    log:
        f"{R}/logs/demo_data.log",
    benchmark:
        f"{R}/benchmarks/demo_data.tsv"
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    params:
        flags=stage_flags(DemoDataSettings),
    shell:
        "prefkd demo-data --out {output} {params.flags} > {log} 2>&1"


rule prepare:
    input:
        source=data_source(),
        tokenizers=expand(f"{R}/tokenizers/{{role}}", role=ROLES),
    output:
        expand(f"{R}/data/{{split}}.parquet", split=SPLITS),
        report=f"{R}/data/filter_report.json",
    log:
        f"{R}/logs/prepare.log",
    benchmark:
        f"{R}/benchmarks/prepare.tsv"
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    params:
        source=source_argument,
        out_dir=lambda w, output: Path(output.report).parent,
        flags=stage_flags(PrepareSettings),
    shell:
        "prefkd prepare --source {params.source} --out-dir {params.out_dir} --tokenizer {input.tokenizers}"
        " {params.flags} > {log} 2>&1"
