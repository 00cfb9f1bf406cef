"""Every prompt text the pipeline sends to a model, as data, each with what it is for."""

# Solver instruction appended to each question for response generation (ScaleQuest stage 5;
# the same wording as Qwen2-Math's, so answers land in \boxed{} for extraction).
SOLVER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# How the question and the instruction are joined in the solver's user turn.
SOLVER_USER_TEMPLATE = "{query}\n{instruction}"

# Stands in for the user-turn content while a chat template is rendered, so the text around it
# (the model's own system prompt, role markers, end-of-turn) can be cut out exactly.
TEMPLATE_SENTINEL = "\u2063SCALEQUEST_USER_TURN\u2063"
