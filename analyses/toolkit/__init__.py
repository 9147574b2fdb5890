"""The toolkit every analysis is built on (and the only thing the paper modules import):

* `hooks`: hook names (``act_name("resid_pre", 3)`` as TransformerLens' ``get_act_name``), layer ranges, site
  masks over positions and heads;
* `positions`: ONE position-set normaliser (`as_positions`) for bool / 0-1 / index sets in any container;
* `metric`: ONE `Metric` contract (logits -> [batch]), checked on every call (`metric_values`);
* `cache`: ONE caching path (`run_cached`), always behind the model's cache-size guard;
* `sweep`: ONE sweep engine (`run_sites`): sites -> cost-planned chunks -> resume from a saved run -> metric;
* `result`: ONE result type (`SweepResult`, with `.scores`);
* `inputs`: the clean / corrupt pair check (`check_pair`) and the patching direction;
* `edits`: transplants between runs, also of different lengths (`transplant_sweep`);
* progress bars (`set_progress(False)` silences all; hooked_vlm/progress.py, shared with generation);
* `stats`: ONE uncertainty layer: `Estimate` (value, ci_low, ci_high, n), bootstrap over prompts, Wilson rates,
  intervals over seeds, rank stability.
"""
from .cache import run_cached
from .inputs import check_direction, check_pair
from .hooks import act_name, check_hook, hook_template, n_heads_of, resolve_layers, site_mask
from .metric import Metric, check_metric_output, metric_per_slot, metric_values
from .edits import first_position, transplant, transplant_edit, transplant_sweep
from .positions import as_positions, random_count, tile, word_positions
from hooked_vlm.progress import progress_bar, set_progress
from .result import SweepResult
from .stats import Estimate, bootstrap, over_seeds, rank_stability, rate
from .sweep import Site, check_batch_size, patch_edit, plan_chunks, resume_start, run_sites

__all__ = ["Estimate", "bootstrap", "over_seeds", "rank_stability", "rate", "Metric", "Site", "SweepResult", "act_name", "as_positions", "first_position", "transplant", "transplant_edit", "transplant_sweep", "word_positions", "check_batch_size", "check_direction", "check_hook", "check_pair",
           "check_metric_output", "hook_template", "metric_per_slot", "metric_values", "n_heads_of", "patch_edit",
           "plan_chunks", "progress_bar", "random_count", "resolve_layers", "resume_start", "run_cached",
           "run_sites", "set_progress", "site_mask", "tile"]
