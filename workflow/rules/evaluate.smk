# Evaluation: lm-eval suites, held-out preference metrics, reward win rates, the report.
# No rule here is an input of training, so changing only `evaluation:` settings reruns
# these jobs and never a training one.


localrules:
    eval_task_data,
    reward_winrate,
    report,


rule eval_task_data:
    # The demo's local lm-eval tasks, written from the held-out split.
    input:
        f"{R}/data/test.parquet",
    output:
        directory(f"{R}/eval/tasks"),
    params:
        seed=config["seed"],
        tasks_digest=local_tasks_digest(),
    log:
        f"{R}/logs/eval/tasks.log",
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "prefkd eval-data --data {input} --out {output} --seed {params.seed} > {log} 2>&1"


rule lm_eval:
    # One job per model x suite, on the model in memory (lm-eval's HFLM).
    input:
        model=lambda w: eval_model_dir(w.model),
        tasks=lambda w: suite_task_data(w.suite),
    output:
        f"{R}/eval/{{model}}/{{suite}}.json",
    params:
        suite=lambda w: suite_argument(EVAL["suites"][w.suite]),
        task_data=lambda w, input: f"--task-data {input.tasks}" if input.tasks else "",
        tasks_digest=lambda w: local_tasks_digest() if suite_task_data(w.suite) else "",
        seed=config["seed"],
        device=EVAL["device"],
    wildcard_constraints:
        model="|".join(re.escape(m) for m in EVAL_MODELS) or "none",
        suite="|".join(re.escape(s) for s in SUITES) or "none",
    threads: 2
    log:
        f"{R}/logs/eval/{{model}}-{{suite}}.log",
    resources:
        mem_mb=16000,
        runtime=600,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} prefkd lm-eval --model {input.model} --name {wildcards.model}"
        " --suite-name {wildcards.suite} --suite {params.suite} {params.task_data} --seed {params.seed}"
        " --device {params.device} --out {output} > {log} 2>&1"


rule preference_eval:
    # Held-out preference accuracy and margin (implicit reward against the role's SFT).
    input:
        model=lambda w: eval_model_dir(w.model),
        tokens=token_shards("test"),
        ref=lambda w: dpo_ref_shards(eval_role(w.model), "test"),
    output:
        f"{R}/eval/{{model}}/preference.json",
    params:
        role=lambda w: eval_role(w.model),
        reference=lambda w: f"{eval_role(w.model)}-sft",
        beta=EVAL["beta"],
        batch=EVAL["batch_size"],
        device=EVAL["device"],
    wildcard_constraints:
        model="|".join(re.escape(m) for m in EVAL_MODELS) or "none",
    threads: 2
    log:
        f"{R}/logs/eval/{{model}}-preference.log",
    resources:
        mem_mb=16000,
        runtime=120,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} prefkd preference-eval --model {input.model} --name {wildcards.model}"
        " --role {params.role} --reference-name {params.reference} --tokens {input.tokens} --ref-signals {input.ref}"
        " --beta {params.beta} --batch-size {params.batch} --device {params.device} --out {output} > {log} 2>&1"


rule generate_and_score:
    # A student answers held-out prompts; the judge scores every answer.
    input:
        model=lambda w: eval_model_dir(w.model),
        data=f"{R}/data/test.parquet",
        judge=reward_judge_models(),
    output:
        f"{R}/eval/{{model}}/generations.jsonl",
    params:
        judge=reward_judge_args(),
        prompts=EVAL["reward"]["max_prompts"],
        new_tokens=EVAL["reward"]["max_new_tokens"],
        batch=EVAL["reward"]["batch_size"],
        seed=config["seed"],
        device=EVAL["device"],
    wildcard_constraints:
        model="|".join(re.escape(m) for m in STUDENT_EVAL_MODELS) or "none",
    threads: 2
    log:
        f"{R}/logs/eval/{{model}}-generations.log",
    resources:
        mem_mb=16000,
        runtime=600,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} prefkd generate --model {input.model} --data {input.data} --out {output}"
        " {params.judge} --max-prompts {params.prompts} --max-new-tokens {params.new_tokens}"
        " --batch-size {params.batch} --seed {params.seed} --device {params.device} > {log} 2>&1"


rule reward_winrate:
    input:
        scores=f"{R}/eval/{{model}}/generations.jsonl",
        baseline=f"{R}/eval/student-sft/generations.jsonl",
    output:
        f"{R}/eval/{{model}}/reward.json",
    params:
        judge=shlex.quote(reward_judge_name()),
    wildcard_constraints:
        model="|".join(re.escape(m) for m in STUDENT_EVAL_MODELS) or "none",
    log:
        f"{R}/logs/eval/{{model}}-reward.log",
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "prefkd winrate --scores {input.scores} --baseline {input.baseline} --model {wildcards.model}"
        " --baseline-name student-sft --judge-name {params.judge} --out {output} > {log} 2>&1"


rule report:
    # The paper-style report: tables from the evaluation JSONs, plots as PNG.
    input:
        evals=report_inputs(),
        alignment=f"{R}/stats/alignment.json",
        weights=f"{R}/stats/weights.json",
        runs=list(report_runs().values()),
    output:
        md=report(f"{R}/report.md", caption="../report/report_md.rst", category="Report"),
        plots=report(
            directory(f"{R}/report"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Figures",
        ),
    params:
        models=" ".join(f"{m}={R}/eval/{m}" for m in EVAL_MODELS),
        suites=" ".join(f"--suite {s}" for s in SUITES),
        runs=" ".join(f"--run {name}={path}" for name, path in report_runs().items()),
        experiment=config["experiment"],
    log:
        f"{R}/logs/report.log",
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        "prefkd report --experiment {params.experiment} --model {params.models} {params.suites} {params.runs}"
        " --alignment {input.alignment} --weights {input.weights} --out {output.md} --plots {output.plots} > {log} 2>&1"
