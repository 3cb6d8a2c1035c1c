# Evaluation: lm-eval suites, held-out preference metrics, reward win rates, the report.
# No rule here is an input of training, so changing only `evaluation:` settings reruns
# these jobs and never a training one.


localrules:
    eval_task_data,
    reward_winrate,
    cost,
    report,


rule eval_task_data:
    # The demo's local lm-eval tasks, written from the held-out split.
    input:
        f"{R}/data/test.parquet",
    output:
        directory(f"{R}/eval/tasks"),
    log:
        f"{R}/logs/eval/tasks.log",
    benchmark:
        f"{R}/benchmarks/eval/tasks.tsv"
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    params:
        flags=stage_flags(EvalDataSettings),
        tasks_digest=local_tasks_digest(),
    shell:
        "prefkd eval-data --data {input} --out {output} {params.flags} > {log} 2>&1"


rule lm_eval:
    # One job per model x suite, on the model in memory (lm-eval's HFLM).
    input:
        model=lambda w: eval_model_dir(w.model),
        tasks=lambda w: suite_task_data(w.suite),
    output:
        f"{R}/eval/{{model}}/{{suite}}.json",
    log:
        f"{R}/logs/eval/{{model}}-{{suite}}.log",
    benchmark:
        f"{R}/benchmarks/eval/{{model}}-{{suite}}.tsv"
    wildcard_constraints:
        model="|".join(re.escape(m) for m in EVAL_MODELS) or "none",
        suite="|".join(re.escape(s) for s in SUITES) or "none",
    conda:
        ENV
    threads: stage_threads("lm_eval")
    resources:
        **stage_resources("lm_eval"),
    params:
        flags=lambda w: stage_flags(LmEvalSettings, name=w.model, suite_name=w.suite, suite=suite_json(w.suite)),
        task_data=lambda w, input: f"--task-data {input.tasks}" if input.tasks else "",
        datasets_cache=f"{R}/cache/datasets",
        tasks_digest=lambda w: local_tasks_digest() if suite_task_data(w.suite) else "",
    shell:
        # lm-eval's dataset cache (datasets' arrow files of every task) stays under the experiment
        "OMP_NUM_THREADS={threads} HF_DATASETS_CACHE={params.datasets_cache}"
        " prefkd lm-eval --model {input.model} {params.task_data} --out {output}"
        " {params.flags} > {log} 2>&1"


rule preference_eval:
    # Held-out preference accuracy and margin (implicit reward against the role's SFT).
    input:
        model=lambda w: eval_model_dir(w.model),
        tokens=token_shards("test"),
        ref=lambda w: dpo_ref_shards(eval_role(w.model), "test"),
    output:
        f"{R}/eval/{{model}}/preference.json",
    log:
        f"{R}/logs/eval/{{model}}-preference.log",
    benchmark:
        f"{R}/benchmarks/eval/{{model}}-preference.tsv"
    wildcard_constraints:
        model="|".join(re.escape(m) for m in EVAL_MODELS) or "none",
    conda:
        ENV
    threads: stage_threads("lm_eval")
    resources:
        **stage_resources("lm_eval"),
    params:
        flags=lambda w: stage_flags(
            PreferenceEvalSettings, name=w.model, role=eval_role(w.model), reference_name=f"{eval_role(w.model)}-sft"
        ),
    shell:
        "OMP_NUM_THREADS={threads} prefkd preference-eval --model {input.model} --tokens {input.tokens}"
        " --ref-signals {input.ref} --out {output} {params.flags} > {log} 2>&1"


rule generate_and_score:
    # A student answers held-out prompts; the judge scores every answer.
    input:
        model=lambda w: eval_model_dir(w.model),
        data=f"{R}/data/test.parquet",
        judge=reward_judge_models(),
    output:
        f"{R}/eval/{{model}}/generations.jsonl",
    log:
        f"{R}/logs/eval/{{model}}-generations.log",
    benchmark:
        f"{R}/benchmarks/eval/{{model}}-generations.tsv"
    wildcard_constraints:
        model="|".join(re.escape(m) for m in STUDENT_EVAL_MODELS) or "none",
    conda:
        ENV
    threads: stage_threads("generate")
    resources:
        **stage_resources("generate"),
    params:
        flags=stage_flags(GenerateSettings, max_prompts=EVAL["reward"]["max_prompts"], **judge_models()),
    shell:
        "OMP_NUM_THREADS={threads} prefkd generate --model {input.model} --data {input.data} --out {output}"
        " {params.flags} > {log} 2>&1"


rule reward_winrate:
    input:
        scores=f"{R}/eval/{{model}}/generations.jsonl",
        baseline=f"{R}/eval/student-sft/generations.jsonl",
    output:
        f"{R}/eval/{{model}}/reward.json",
    log:
        f"{R}/logs/eval/{{model}}-reward.log",
    benchmark:
        f"{R}/benchmarks/eval/{{model}}-reward.tsv"
    wildcard_constraints:
        model="|".join(re.escape(m) for m in STUDENT_EVAL_MODELS) or "none",
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    params:
        flags=lambda w: stage_flags(
            WinrateSettings, model=w.model, baseline_name="student-sft", judge_name=reward_judge_name()
        ),
    shell:
        "prefkd winrate --scores {input.scores} --baseline {input.baseline} --out {output} {params.flags} > {log} 2>&1"


rule cost:
    # Wall time, CPU time, processes and estimated FLOPs per stage, and each student run end to end.
    input:
        done=[t for t in all_targets() if not t.endswith("report.md")] + report_inputs(),
        tokens=[p for split in SPLITS for p in token_shards(split)],
    output:
        f"{R}/stats/cost.json",
    log:
        f"{R}/logs/cost.log",
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    params:
        plan=lambda w: json.dumps(cost_plan(), sort_keys=True),
        benchmarks=f"{R}/benchmarks",
    shell:
        "prefkd cost --plan {params.plan:q} --benchmarks {params.benchmarks} --tokens {input.tokens}"
        " --out {output} > {log} 2>&1"


rule report:
    # The paper-style report: tables from the evaluation JSONs, plots as PNG.
    input:
        evals=report_inputs(),
        alignment=f"{R}/stats/alignment.json",
        weights=f"{R}/stats/weights.json",
        filters=f"{R}/data/filter_report.json",
        runs=list(report_runs().values()),
        cost=f"{R}/stats/cost.json",
        searches=[grid_selected(m) for m in SEARCHED],
    output:
        md=report(f"{R}/report.md", caption="../report/report_md.rst", category="Report"),
        plots=report(
            directory(f"{R}/report"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Figures",
        ),
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    params:
        flags=stage_flags(
            ReportSettings,
            model=[f"{m}={R}/eval/{m}" for m in EVAL_MODELS],
            suite=SUITES,
            run=[f"{name}={path}" for name, path in report_runs().items()],
            **lr_flags(),
        ),
    shell:
        "prefkd report --alignment {input.alignment} --weights {input.weights} --filters {input.filters}"
        " --cost {input.cost}"
        " --out {output.md} --plots {output.plots}"
        " {params.flags} > {log} 2>&1"
