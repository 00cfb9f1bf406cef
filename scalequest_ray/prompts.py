"""Every prompt text the pipeline sends to a model, as data, each with what it is for."""

# Solver instruction appended to each question for response generation (ScaleQuest stage 5;
# the same wording as Qwen2-Math's, so answers land in \boxed{} for extraction).
SOLVER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# How the question and the instruction are joined in the solver's user turn.
SOLVER_USER_TEMPLATE = "{query}\n{instruction}"

# Stands in for the user-turn content while a chat template is rendered, so the text around it
# (the model's own system prompt, role markers, end-of-turn) can be cut out exactly.
TEMPLATE_SENTINEL = "\u2063SCALEQUEST_USER_TURN\u2063"

# --- QPO: the optimizer model rewrites a generated question in ONE direction (ScaleQuest stage 2).
# Both end with the same fixed marker so the rewrite can be parsed; see text.parse_rewrite.
REWRITE_MARKER = "Final question:"

# Direction (a): make the question solvable: a math problem with one numerical answer,
# self-contained, consistent with common sense, no solution included. Fix it if it is not.
OPTIMIZER_SOLVABILITY = (
    "You are improving a math word problem so that a student can actually solve it.\n\n"
    "Problem:\n{query}\n\n"
    "Check it carefully:\n"
    "1. It must be a math problem whose answer is a single number.\n"
    "2. Everything needed to solve it must be stated in the problem itself.\n"
    "3. Its facts and quantities must make sense in the real world.\n"
    "4. It must not contain its own solution or answer.\n"
    "Explain briefly what, if anything, breaks these rules, then write a corrected version that "
    "keeps the original idea and changes as little as possible (if nothing is wrong, repeat it "
    "with only light polishing).\n"
    "End your reply with the line '" + REWRITE_MARKER + "' followed by the corrected problem and "
    "nothing after it."
)

# Direction (b): make the question harder while adding only 10-20 words.
OPTIMIZER_DIFFICULTY = (
    "You are making a math problem more challenging.\n\n"
    "Problem:\n{query}\n\n"
    "Rewrite it into a harder version: for example add a step of reasoning, a constraint, or a "
    "less direct quantity. Add only 10 to 20 words, keep it a self-contained problem with a "
    "single numerical answer, and do not include a solution.\n"
    "Briefly say how you made it harder, then end your reply with the line '" + REWRITE_MARKER +
    "' followed by the new problem and nothing after it."
)

OPTIMIZER_PROMPTS = {"solvability": OPTIMIZER_SOLVABILITY, "difficulty": OPTIMIZER_DIFFICULTY}

# --- Solvability filter (ScaleQuest stage 3): the solver, greedy, judges each question. The
# verdict is read from the fixed last line only (text.parse_verdict), never "yes anywhere".
VERDICT_MARKER = "Verdict:"
SOLVABILITY_INSTRUCTION = (
    "Decide whether the following text is a math problem that can be solved using only the "
    "information it gives.\n\n"
    "Text:\n{query}\n\n"
    "Think about it briefly: is it a math problem? Are all the quantities and conditions needed "
    "to reach one answer stated, and do they make sense together? "
    "Then end your reply with a last line that is exactly '" + VERDICT_MARKER + " Yes' or '"
    + VERDICT_MARKER + " No'."
)
