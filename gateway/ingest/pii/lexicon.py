"""Offline lexicon for Chinese personal names.

Built from Faker's zh_CN person provider (installed with the project, so nothing is
downloaded at run time) plus short hand-written lists. The lists only have to be good
enough to tell "looks like a name" from "looks like medical or administrative text".
"""

from __future__ import annotations

from faker.providers.person.zh_CN import Provider as _ZhPersonProvider

__all__ = [
    "AFTER_CONTEXT",
    "BEFORE_CONTEXT",
    "COMPOUND_SURNAMES",
    "CONTEXT_LINKS",
    "CONTEXT_SEPARATORS",
    "KNOWN_GIVEN_NAMES",
    "NAME_CHARS",
    "NAME_PRECEDERS",
    "NOT_NAME_FOLLOWERS",
    "NOT_NAME_GIVEN_CHARS",
    "NOT_NAME_WORDS",
    "SINGLE_SURNAMES",
    "is_han",
]

_faker_surnames: tuple[str, ...] = tuple(_ZhPersonProvider.last_names)
_faker_given: tuple[str, ...] = tuple(_ZhPersonProvider.first_names)

COMPOUND_SURNAMES: frozenset[str] = frozenset(
    {
        "欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙",
        "宇文", "司徒", "司空", "夏侯", "轩辕", "令狐", "钟离", "端木", "独孤", "南宫",
        "西门", "呼延", "澹台", "公冶", "申屠", "太史", "闻人", "赫连", "拓跋", "万俟",
    }
    | {s for s in _faker_surnames if len(s) == 2}
)  # fmt: skip

# Real single surnames missing from Faker that also start medical terms (冠心病);
# listed so the false-positive guards are exercised by them too.
_EXTRA_SINGLE_SURNAMES = frozenset({"冠"})

SINGLE_SURNAMES: frozenset[str] = frozenset(
    {s for s in _faker_surnames if len(s) == 1} | _EXTRA_SINGLE_SURNAMES
)

KNOWN_GIVEN_NAMES: frozenset[str] = frozenset(_faker_given)

# Characters frequent in given names. A candidate whose given part uses only these
# scores "name-like"; anything else scores "weak".
_HAND_NAME_CHARS = (
    "小晓志国文海金玉春秀子嘉家梓涵欣怡宇轩浩然博雨诗思佳俊丽芳娜永德福贵光立新振天世"
    "荣斌彤睿泽昊晨辰航杰琪琳瑶萱妍雅婷倩蕾薇蓉菲露月美淑惠慧霞凤兰华珍芬娥琼翠秋冬"
    "梅莲菊桂红燕艳亮强刚勇毅峰岭林森松柏江波涛洋清源鑫锋钢铭军兵伟建平宁乐欢喜瑞祥"
    "凯旭东宏鸿鹏飞龙虎彪豪英雄娟敏静丹萍莉晶颖雪洁琴畅云莹璐瑜欢阳帆帅磊超鹏辉明"
)
NAME_CHARS: frozenset[str] = frozenset(_HAND_NAME_CHARS) | frozenset("".join(_faker_given))

# Characters that (almost) never appear in a given name but are everywhere in diagnoses,
# procedures and claim text. A given part containing one of them is not a name.
NOT_NAME_GIVEN_CHARS: frozenset[str] = frozenset(
    "病症炎癌瘤血压型性管腺脏尿糖肺肾脑肝胆胃肠脾胰心肌梗死肿痛伤折感染障碍衰竭综征疾患"
    "药术院科诊检查治疗费医保险期级度部位氏癣疹疮痔痘疱瘫痪疝溃疡囊积液脓毒菌素酸碱钙"
    "钾钠片剂针丸颗粒注射服脉骨髓膜腔道体质量率值常规复发作用于的了是在和与及或因为所"
    "以对从向被把将已经未不无有也都就还等其该此内外上下左右前后中间时日年次个例号床"
    "妊娠产分娩孕胎宫卵巢乳房眼耳鼻喉牙齿颈腰椎腿臂膝关节状态哮喘咳嗽痰热寒虚损缺陷畸硬化"
    "栓塞狭窄扩张出贫乏营养代谢紊乱失急慢恶良阑尾创烧烫咬休克昏迷晕眩瘙痒疼麻痹肥胖女士先吸颤突屑滋脂"
)

# Common words and place names that are "surname + known given name" by accident.
NOT_NAME_WORDS: frozenset[str] = frozenset(
    {
        "安静", "平静", "冷静", "宁静", "和平", "公平", "文明", "高强", "高明", "明明",
        "查明", "鲜明", "黎明", "简明", "申明", "房东", "华东", "江东", "关东", "白云",
        "海军", "陆军", "金刚", "海洋", "宁波", "沈阳", "安阳", "南阳", "平阳", "衡阳",
        "信阳", "岳阳", "邵阳", "揭阳", "向阳", "阴阳", "南宁", "江宁", "海宁", "常宁",
        "安宁", "康宁", "金华", "荣华", "华丽", "白雪", "高峰", "高超", "高飞", "高亮",
        "高平", "昌平", "康健", "万明",
    }
)  # fmt: skip

# A candidate directly followed by one of these is a place (沈阳市, 江宁区), not a person.
NOT_NAME_FOLLOWERS: frozenset[str] = frozenset("市县区省镇乡村路街州")

# Words that announce a person's name shortly before it (患者张伟) or right after it (王女士).
BEFORE_CONTEXT: tuple[str, ...] = (
    "姓名", "患者", "病人", "联系人", "参保人", "被保险人", "投保人", "申请人", "就诊人",
    "家属", "监护人", "经办人", "签字", "签名", "医师", "医生", "护士",
)  # fmt: skip
AFTER_CONTEXT: tuple[str, ...] = ("先生", "女士", "同志", "小姐", "老师")
# May stand between a context word and the name: "联系人：王芳", "患者为张伟".
CONTEXT_SEPARATORS: frozenset[str] = frozenset(" \t:：,，、(（[【")
CONTEXT_LINKS: frozenset[str] = frozenset("为是叫")

# Han characters after which a name often starts without punctuation (由张伟签字,
# 与王芳联系). A candidate glued to any other Han character is probably mid-word.
NAME_PRECEDERS: frozenset[str] = frozenset(
    "由与和及给叫是为请找见向对让被把将跟同帮陪经致问知令派交约"
)


def is_han(ch: str) -> bool:
    """True for a CJK unified ideograph (basic block or extension A)."""
    o = ord(ch)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF
